"""A detector module whose forward pass can be traced into a graph (TorchScript, ONNX).

    graph = ExportableDetector(model, canvas_hw=(192, 192)).eval()
    boxes, scores, labels = graph(canvas, scale, image_size)

Inputs, for one image on one canvas (bucket) ``Hc x Wc``:

- ``canvas``: ``(Hc, Wc, 3)`` uint8 RGB, the image resized by ``scale`` with PIL's bilinear
  filter to ``(round(h * scale), round(w * scale))`` (at least 1 px, at most the canvas) and placed
  at the top-left corner, the rest zeros: exactly ``frcnn.canvas.CanvasTransform.apply_image``.
- ``scale``: ``(1,)`` float32, the factor used for that resize.
- ``image_size``: ``(2,)`` int64, the original image's ``[h, w]``.

Outputs: ``boxes`` ``(N, 4)`` float32 ``[x1, y1, x2, y2]`` in the original image's pixels (clipped
to it), ``scores`` ``(N,)`` float32, ``labels`` ``(N,)`` int64 (1..C), best first.

Inside the graph: normalisation, backbone, RPN, proposal selection, RoI head, per-class decoding,
score threshold, NMS and the mapping back to the image's pixels; the same modules and thresholds
as ``FasterRCNN.detect``. The proposals are ``ProposalLayer``'s (its branches depend only on the
canvas, fixed per graph). The detection step is ``RoIHeads.postprocess_detections`` for one image
with one change: torchvision's ``batched_nms`` returns early, a Python branch, when no box passes
the score threshold, which a trace would freeze; here one NMS over boxes offset by class holds
for every image, including one without any detection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from .boxes import clip_boxes
from .errors import ConfigError
from .model import FasterRCNN

__all__ = ["ExportableDetector"]


class ExportableDetector(nn.Module):
    """``FasterRCNN`` inference for one image on one canvas (bucket), as a traceable module."""

    def __init__(self, model: FasterRCNN, canvas_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        hw = tuple(int(v) for v in (canvas_hw or model.canvas_hw))
        if hw not in model.cfg.canvas.sizes:
            sizes = " or ".join(f"{h}x{w}" for h, w in model.cfg.canvas.sizes)
            raise ConfigError(f"canvas {hw[0]}x{hw[1]}: the model's canvas is {sizes}")
        self.canvas_hw = hw
        self.register_buffer("anchors", model.anchors_for(hw).clone(), persistent=False)

    def detections(self, cls_logits: Tensor, box_deltas: Tensor, rois: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image's head output -> canvas boxes, scores, labels (``RoIHeads.postprocess_detections``):
        per-class decode, clip, score threshold, per-class NMS, the ``detections_per_img`` best."""
        heads = self.model.roi_heads
        cfg, k = heads.cfg, heads.num_classes
        scores = F.softmax(cls_logits.float(), dim=-1)[:, 1:].reshape(-1)  # drop background
        boxes = clip_boxes(heads.box_coder.decode(box_deltas, rois).reshape(-1, k, 4), *self.canvas_hw)
        boxes = boxes[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, k).repeat(rois.shape[0])
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = torch.nonzero((scores > cfg.score_thresh) & (wh > 1e-2).all(dim=1)).flatten()
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # Per-class NMS as one NMS: each class's boxes moved apart by more than the canvas (the
        # offset is a constant, so no reduction over a possibly empty set of boxes).
        offsets = (labels * (max(self.canvas_hw) + 1)).to(boxes.dtype)[:, None]
        keep = nms(boxes + offsets, scores, cfg.nms_thresh)[: cfg.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def forward(self, canvas: Tensor, scale: Tensor, image_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        images = canvas.permute(2, 0, 1).unsqueeze(0)  # (Hc, Wc, 3) -> (1, 3, Hc, Wc)
        features, logits, deltas = self.model._rpn(images)
        rois = self.model.proposal_layer(self.anchors, logits, deltas, self.canvas_hw, False)[0]
        cls_logits, box_deltas = self.model.roi_heads.predict(features, [rois])
        boxes, scores, labels = self.detections(cls_logits, box_deltas, rois)
        # Canvas -> original pixels (CanvasTransform.invert_boxes), with the size as a tensor.
        size = image_size.to(torch.float32)
        boxes = boxes / scale.to(torch.float32)
        x = boxes[:, 0::2].clamp(min=0.0).minimum(size[1])
        y = boxes[:, 1::2].clamp(min=0.0).minimum(size[0])
        return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1), scores, labels
