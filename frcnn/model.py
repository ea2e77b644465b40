"""Faster R-CNN: backbone -> RPN -> RoI heads, on a fixed canvas, batched.

    model = FasterRCNN(tiny_config())
    losses = model(images, targets)        # training: dict with LOSS_KEYS
    dets = model(images)                   # eval: canvas boxes per image
    props = model.propose(images)          # the RPN's proposals; model(images, targets, props) trains the head on them
    dets = model.detect(images, scales, orig_sizes)   # eval: original-image boxes

``images``: ``(B, 3, H, W)`` uint8 (0..255) or float (0..1) canvases; normalisation is inside.
``targets``: ``{"boxes": [FloatTensor[N_i, 4]], "labels": [Int64Tensor[N_i]]}`` in canvas pixels,
optionally with precomputed ``"anchor_labels"`` (B, H*W*A) int8 and ``"anchor_deltas"``
(B, H*W*A, 4); without them the model assigns anchor targets itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .anchors import assign_anchor_targets, grid_anchors
from .backbones import build_backbone
from .boxes import BoxCoder
from .canvas import CanvasTransform
from .config import ModelConfig
from .roi_heads import RoIHeads
from .rpn import ProposalLayer, RPNHead, rpn_loss

# Stable metric names: what makes runs comparable in MLflow.
LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_loc", "loss_roi_cls", "loss_roi_loc")


class FasterRCNN(nn.Module):
    def __init__(self, cfg: ModelConfig, *, load_backbone_weights: bool = True) -> None:
        """``load_backbone_weights=False``: the same architecture without reading (or downloading)
        ``cfg.backbone.weights``, for a model whose state dict comes next (a checkpoint, DDP's
        broadcast from rank 0)."""
        super().__init__()
        self.cfg = cfg
        bb = build_backbone(cfg.backbone, cfg.roi, cfg.anchors.stride, load_weights=load_backbone_weights)
        self.backbone = bb.body
        self.rpn_head = RPNHead(bb.out_channels, cfg.rpn.mid_channels, cfg.anchors.num_anchors)
        self.roi_heads = RoIHeads(cfg.roi, bb.head, bb.head_out, cfg.num_classes + 1, cfg.anchors.stride,
                                  bb.out_channels)
        self.rpn_coder = BoxCoder(cfg.rpn.box_weights)
        self.proposal_layer = ProposalLayer(cfg.rpn, self.rpn_coder)
        fh, fw = cfg.feature_size_for(self.canvas_hw)
        a = cfg.anchors
        # The default canvas's grid; other buckets' grids are built on first use (anchors_for).
        self.register_buffer("anchors", grid_anchors(fh, fw, a.stride, a.scales, a.ratios), persistent=False)
        self._bucket_anchors: dict[tuple[int, int], Tensor] = {}
        self.register_buffer("pixel_mean", torch.tensor(cfg.canvas.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.canvas.std).view(1, 3, 1, 1), persistent=False)
        self.canvas = CanvasTransform.from_config(cfg.canvas)

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return self.cfg.canvas.height, self.cfg.canvas.width

    def anchors_for(self, canvas_hw: tuple[int, int]) -> Tensor:
        """The anchor grid of one canvas (bucket), on the model's device."""
        hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        if hw == self.canvas_hw:
            return self.anchors
        grid = self._bucket_anchors.get(hw)
        if grid is None or grid.device != self.anchors.device:
            fh, fw = self.cfg.feature_size_for(hw)
            a = self.cfg.anchors
            grid = self._bucket_anchors[hw] = grid_anchors(fh, fw, a.stride, a.scales, a.ratios).to(self.anchors.device)
        return grid

    def normalize(self, images: Tensor) -> Tensor:
        """RGB canvases (uint8 0..255 or float 0..1) -> what the backbone's weights expect: RGB
        0..1 standardised (torchvision), or BGR 0..255 minus the mean (Caffe-converted VGG16)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.cfg.backbone.input_format == "caffe":
            x = x.flip(1) * 255.0  # RGB -> BGR; canvas.mean/std are in BGR 0..255 units
        return (x - self.pixel_mean) / self.pixel_std

    def anchor_targets(self, boxes: list[Tensor], canvas_hw: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Assign anchor targets in the model (when none were precomputed) on ``canvas_hw``'s grid
        (default: the config's canvas)."""
        hw = canvas_hw or self.canvas_hw
        anchors = self.anchors_for(hw)
        labels, deltas = [], []
        for b in boxes:
            t = assign_anchor_targets(anchors, b, hw, self.cfg.rpn.pos_iou,
                                      self.cfg.rpn.neg_iou, self.rpn_coder)
            labels.append(t.labels)
            deltas.append(t.deltas)
        return torch.stack(labels), torch.stack(deltas)

    def _rpn(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> backbone features, RPN logits (B, H*W*A, 2) and deltas (B, H*W*A, 4)."""
        hw = tuple(images.shape[-2:])
        if hw not in self.cfg.canvas.sizes:  # a batch holds one canvas (bucket): one anchor grid
            sizes = " or ".join(f"{h}x{w}" for h, w in self.cfg.canvas.sizes)
            raise ValueError(f"images are {hw[0]}x{hw[1]}, the canvas is {sizes}")
        features = self.backbone(self.normalize(images))
        return (features, *self.rpn_head(features))

    def forward(self, images: Tensor, targets: dict | None = None, proposals: list[Tensor] | None = None):
        """``proposals`` (canvas boxes per image), when given, replace the RPN's as the RoI head's
        input (Fast R-CNN on external proposals; or two models compared on the same RoIs). The RPN
        still runs, and its losses are still computed in training."""
        features, logits, deltas = self._rpn(images)
        hw = tuple(images.shape[-2:])
        if proposals is None:
            proposals = self.proposal_layer(self.anchors_for(hw), logits, deltas, hw, self.training)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            if "anchor_labels" in targets:
                a_labels, a_deltas = targets["anchor_labels"], targets["anchor_deltas"]
            else:
                a_labels, a_deltas = self.anchor_targets(targets["boxes"], hw)
            losses = rpn_loss(self.cfg.rpn, logits, deltas, a_labels, a_deltas, tuple(features.shape[-2:]))
            losses.update(self.roi_heads.forward_train(features, proposals, targets["boxes"], targets["labels"]))
            return losses
        cls_logits, box_deltas = self.roi_heads.predict(features, proposals)
        return self.roi_heads.postprocess_detections(cls_logits, box_deltas, proposals, hw)

    @torch.no_grad()
    def propose(self, images: Tensor) -> list[Tensor]:
        """The RPN's proposals per image (canvas boxes, best first), with the training or the test
        counts (``rpn.*_top_n_train`` / ``_test``) as the module is in train or eval mode."""
        _, logits, deltas = self._rpn(images)
        hw = tuple(images.shape[-2:])
        return self.proposal_layer(self.anchors_for(hw), logits, deltas, hw, self.training)

    @torch.no_grad()
    def detect(self, images: Tensor, scales: list[float] | Tensor, orig_sizes: list[tuple[int, int]]
               ) -> list[dict[str, Tensor]]:
        """Detections with boxes mapped back to each original image through the canvas transform."""
        was_training = self.training
        self.eval()
        try:
            dets = self(images)
        finally:
            self.train(was_training)
        for d, s, (h, w) in zip(dets, scales, orig_sizes, strict=True):
            d["boxes"] = self.canvas.invert_boxes(d["boxes"], float(s), int(h), int(w))
        return dets


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    return sum(losses[k] for k in LOSS_KEYS)
