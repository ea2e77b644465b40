"""Fast R-CNN head: proposal targets, RoI pooling, classification and box regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, roi_align, roi_pool

from .anchors import random_subset
from .boxes import BoxCoder, clip_boxes
from .config import RoIHeadConfig
from .errors import ConfigError
from .precision import float32_layer


class ProposalTargetCreator:
    """Sample ``batch_size_per_image`` RoIs per image, at most ``positive_fraction`` foreground
    (IoU >= fg_iou), the rest background (IoU in [bg_iou_lo, bg_iou_hi)); ground-truth boxes are
    added to the proposals so that the head always sees some foreground.

    The sample is drawn on the proposals' device and has a fixed size, min(batch_size_per_image,
    proposals + boxes): chosen foreground first, then chosen background, each in random order; when
    there are fewer candidates than that, the rest are filler RoIs labelled -1, which no loss counts.
    Nothing waits for the host."""

    def __init__(self, cfg: RoIHeadConfig, box_coder: BoxCoder) -> None:
        self.cfg = cfg
        self.box_coder = box_coder

    @torch.no_grad()
    def __call__(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """-> sampled rois (R, 4), labels (R,) 0..C or -1 (filler), regression targets (R, 4)."""
        cfg = self.cfg
        device = proposals.device
        gt_boxes = gt_boxes.to(device=device, dtype=proposals.dtype)
        rois = torch.cat([proposals, gt_boxes], dim=0)
        if gt_boxes.numel() == 0:
            max_iou = torch.zeros(rois.shape[0], device=device)
            matched = torch.zeros(rois.shape[0], dtype=torch.long, device=device)
            gt_boxes, gt_labels = rois[:1], torch.zeros(1, dtype=torch.long)  # never chosen: no foreground
        else:
            max_iou, matched = box_iou(rois, gt_boxes).max(dim=1)
        fg = max_iou >= cfg.fg_iou
        bg = (max_iou < cfg.bg_iou_hi) & (max_iou >= cfg.bg_iou_lo) & ~fg
        n_fg = fg.sum().clamp(max=int(cfg.batch_size_per_image * cfg.positive_fraction))
        n_bg = torch.minimum(bg.sum(), cfg.batch_size_per_image - n_fg)
        keys = torch.rand(rois.shape[0], generator=generator, device=device)
        fg, bg = random_subset(fg, n_fg, keys), random_subset(bg, n_bg, keys)
        # Chosen foreground (by key), then chosen background (by key), then the rest.
        order = torch.where(fg, keys, torch.where(bg, keys + 1.0, torch.full_like(keys, 3.0))).argsort()
        keep = order[:min(cfg.batch_size_per_image, rois.shape[0])]
        fg, bg, rois, matched = fg[keep], bg[keep], rois[keep], matched[keep]
        rois = torch.where((fg | bg)[:, None], rois, 0.0)  # fillers: a finite box whatever the proposals were
        labels = torch.where(fg, gt_labels.to(device)[matched], torch.where(bg, 0, -1))
        targets = self.box_coder.encode(gt_boxes[matched], rois).float()
        return rois, labels, torch.where(fg[:, None], targets, 0.0)


class RoIHeads(nn.Module):
    def __init__(self, cfg: RoIHeadConfig, head: nn.Module, head_out: int, num_classes: int, stride: int,
                 in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.reduce = (nn.Sequential(nn.Conv2d(in_channels, cfg.reduce_channels, 1), nn.ReLU(inplace=True))
                       if cfg.reduce_channels else nn.Identity())
        if cfg.reduce_channels:  # He init, as the light head's layers (frcnn/backbones.py)
            nn.init.kaiming_normal_(self.reduce[0].weight, nonlinearity="relu")
            nn.init.zeros_(self.reduce[0].bias)
        self.head = head
        self.num_classes = num_classes  # including background
        self.spatial_scale = 1.0 / stride
        self.cls_score = nn.Linear(head_out, num_classes)
        self.bbox_pred = nn.Linear(head_out, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.box_coder = BoxCoder(cfg.box_weights)
        self.target_creator = ProposalTargetCreator(cfg, self.box_coder)

    def pool(self, features: Tensor, rois: list[Tensor]) -> Tensor:
        """RoIs in canvas pixels -> (R, C, P, P) float32 features (torchvision.ops; no Python loop).

        Pooling runs in float32 whatever the autocast dtype: a bfloat16 RoI has 8 significant bits,
        so [517.9, 300.3, 798.0, 611.7] would be pooled as [516, 300, 800, 612] while its regression
        target is encoded against the exact box; and bilinear sampling of low-precision features
        adds its own rounding. The features are upcast for this op only (the convolutions before
        and the head's layers after still run in the autocast dtype)."""
        p = self.cfg.pool_size
        features = self.reduce(features)
        boxes = [r.float() for r in rois]
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.cfg.pool == "align":
                return roi_align(features, boxes, (p, p), self.spatial_scale, self.cfg.sampling_ratio, aligned=True)
            if self.cfg.pool == "pool":
                return roi_pool(features, boxes, (p, p), self.spatial_scale)
        raise ConfigError(f"roi.pool {self.cfg.pool!r}: align or pool")

    def predict(self, features: Tensor, rois: list[Tensor]) -> tuple[Tensor, Tensor]:
        """-> class logits (R, K) and class-specific deltas (R, 4K), both float32."""
        x = self.head(self.pool(features, rois))
        return float32_layer(self.cls_score, x), float32_layer(self.bbox_pred, x)

    def loss(self, cls_logits: Tensor, box_deltas: Tensor, labels: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Labels -1 (filler RoIs) count in neither loss; the box loss is the foreground's, by mask."""
        cfg = self.cfg
        loss_cls = F.cross_entropy(cls_logits.float(), labels, ignore_index=-1)
        fg = labels > 0
        cls = labels.clamp(min=0)[:, None, None].expand(-1, 1, 4)
        pred = box_deltas.reshape(box_deltas.shape[0], -1, 4).gather(1, cls).squeeze(1)  # (R, K*4) -> (R, 4)
        per_roi = F.smooth_l1_loss(pred.float(), targets, beta=cfg.smooth_l1_beta, reduction="none").sum(1)
        loc_sum = torch.where(fg, per_roi, 0.0).sum()
        if cfg.loc_normalizer == "sampled":
            norm = (labels >= 0).sum().clamp(min=1)
        elif cfg.loc_normalizer == "positives":
            norm = fg.sum().clamp(min=1)
        else:
            raise ConfigError(f"roi.loc_normalizer {cfg.loc_normalizer!r}: sampled or positives")
        return {"loss_roi_cls": loss_cls, "loss_roi_loc": cfg.loc_weight * loc_sum / norm}

    def forward_train(self, features: Tensor, proposals: list[Tensor], gt_boxes: list[Tensor],
                      gt_labels: list[Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        rois, labels, targets = [], [], []
        for props, boxes, labs in zip(proposals, gt_boxes, gt_labels, strict=True):
            r, lab, t = self.target_creator(props, boxes, labs, generator)
            rois.append(r)
            labels.append(lab)
            targets.append(t)
        cls_logits, box_deltas = self.predict(features, rois)
        return self.loss(cls_logits, box_deltas, torch.cat(labels), torch.cat(targets))

    @torch.no_grad()
    def postprocess_detections(self, cls_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor],
                               canvas_hw: tuple[int, int]) -> list[dict[str, Tensor]]:
        """Per-class decode, clip, score threshold, ``batched_nms``, top detections: canvas boxes."""
        cfg = self.cfg
        k = self.num_classes
        scores_all = F.softmax(cls_logits.float(), dim=-1)
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(proposals))  # (R, K*4)
        boxes_all = clip_boxes(boxes_all.reshape(-1, k, 4), *canvas_hw)
        out = []
        start = 0
        for props in proposals:
            n = props.shape[0]
            boxes = boxes_all[start:start + n, 1:].reshape(-1, 4)  # drop background
            scores = scores_all[start:start + n, 1:].reshape(-1)
            labels = torch.arange(1, k, device=boxes.device).repeat(n)
            start += n
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = torch.nonzero((scores > cfg.score_thresh) & (wh > 1e-2).all(dim=1)).flatten()
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out
