"""Anchors and the RPN's training targets (Ren et al. 2015, section 3.1.2).

Anchor order, everywhere in this package: index ``(y * W + x) * A + a`` for feature cell (y, x)
and anchor ``a = ratio_index * len(scales) + scale_index``. It is the order of the RPN head's
outputs after ``permute(0, 2, 3, 1)`` (the walkthrough enumerated x-major and so paired each
prediction with the wrong anchor).

Targets are computed once per image (by the precompute pipeline or by the model itself) and
*before* sampling: ``sample_anchor_labels`` draws a fresh 256-anchor sample at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .boxes import BoxCoder

# Anchor half-sizes are rounded to 1/256 px so that every anchor coordinate is exact in float32
# and the mirror image of an anchor is exactly another anchor: a flipped canvas then gets
# bit-identical IoUs, and so identical labels, ties included. The change is < 0.002 px.
_ANCHOR_QUANTUM = 256.0


def cell_anchors(stride: int, scales: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
    """The A anchors of one cell centred at the origin, ``(A, 4)`` float64.

    h = stride * scale * sqrt(ratio), w = stride * scale / sqrt(ratio): ratio is height/width and
    the area is (stride * scale)^2, as in the walkthrough.
    """
    out = []
    for r in ratios:
        for s in scales:
            h = stride * s * r**0.5
            w = stride * s * (1.0 / r) ** 0.5
            hh = round(h / 2 * _ANCHOR_QUANTUM) / _ANCHOR_QUANTUM
            hw = round(w / 2 * _ANCHOR_QUANTUM) / _ANCHOR_QUANTUM
            out.append((-hw, -hh, hw, hh))
    return torch.tensor(out, dtype=torch.float64)


def grid_anchors(feat_h: int, feat_w: int, stride: int, scales: tuple[float, ...],
                 ratios: tuple[float, ...]) -> Tensor:
    """All anchors of a ``feat_h x feat_w`` map, ``(feat_h * feat_w * A, 4)`` float32, centred on
    each cell at ``((x + 0.5) * stride, (y + 0.5) * stride)``."""
    base = cell_anchors(stride, scales, ratios)  # (A, 4)
    cy = (torch.arange(feat_h, dtype=torch.float64) + 0.5) * stride
    cx = (torch.arange(feat_w, dtype=torch.float64) + 0.5) * stride
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")  # (H, W): y-major, as the head's outputs
    centres = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4).float()  # (H*W, A, 4) -> (H*W*A, 4)


@dataclass
class AnchorTargets:
    """Per-anchor targets of one image, before sampling.

    labels:  int8 ``(N,)``: 1 positive, 0 negative, -1 ignored.
    matched: int64 ``(N,)``: index of the box each anchor overlaps most (-1 with no boxes).
    deltas:  float32 ``(N, 4)``: encoded regression target; zero except at positives.
    """

    labels: Tensor
    matched: Tensor
    deltas: Tensor

    @property
    def pos_index(self) -> Tensor:
        return torch.nonzero(self.labels == 1).flatten()


def assign_anchor_targets(anchors: Tensor, boxes: Tensor, canvas_hw: tuple[int, int],
                          pos_iou: float = 0.7, neg_iou: float = 0.3,
                          box_coder: BoxCoder | None = None) -> AnchorTargets:
    """Label anchors against ground-truth ``boxes`` (walkthrough's rules, with its flaws fixed).

    - anchors crossing the canvas border are ignored (-1);
    - negative (0) if the max IoU with every box is < ``neg_iou``;
    - positive (1) if the max IoU is >= ``pos_iou``, or if the anchor has the highest IoU of all
      inside anchors for some box (ties included) and that IoU is > 0: a box that overlaps no
      inside anchor makes no anchor positive (the walkthrough made every zero-IoU anchor positive);
    - with no boxes, every inside anchor is negative.
    IoU is computed in float64 so that equal overlaps compare equal.
    """
    coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
    n = anchors.shape[0]
    device = anchors.device
    height, width = canvas_hw
    labels = torch.full((n,), -1, dtype=torch.int8, device=device)
    matched = torch.full((n,), -1, dtype=torch.int64, device=device)
    deltas = torch.zeros((n, 4), dtype=torch.float32, device=device)

    a64 = anchors.double()
    inside = (a64[:, 0] >= 0) & (a64[:, 1] >= 0) & (a64[:, 2] <= width) & (a64[:, 3] <= height)
    inside_idx = torch.nonzero(inside).flatten()
    if boxes.numel() == 0:
        labels[inside_idx] = 0
        return AnchorTargets(labels, matched, deltas)

    iou = box_iou(a64[inside_idx], boxes.to(device=device, dtype=torch.float64))  # (n_in, n_box)
    max_iou, argmax = iou.max(dim=1)
    gt_max = iou.max(dim=0).values  # (n_box,)
    is_best = ((iou == gt_max[None]) & (gt_max[None] > 0)).any(dim=1)

    lab = torch.full((inside_idx.numel(),), -1, dtype=torch.int8, device=device)
    lab[max_iou < neg_iou] = 0
    lab[is_best] = 1
    lab[max_iou >= pos_iou] = 1
    labels[inside_idx] = lab
    matched[inside_idx] = argmax

    pos = inside_idx[lab == 1]
    if pos.numel():
        deltas[pos] = coder.encode(boxes.to(device)[matched[pos]].float(), anchors[pos]).float()
    return AnchorTargets(labels, matched, deltas)


def sample_anchor_labels(labels: Tensor, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                         generator: torch.Generator | None = None) -> Tensor:
    """Draw a fresh balanced sample from ``(B, N)`` anchor labels; the unsampled become -1.

    At most ``positive_fraction * batch_size_per_image`` positives, negatives fill the rest.
    """
    labels = labels.long()
    pos = labels == 1
    neg = labels == 0
    num_pos = torch.clamp(pos.sum(1), max=int(batch_size_per_image * positive_fraction))
    num_neg = torch.minimum(neg.sum(1), batch_size_per_image - num_pos)
    keys = torch.rand(labels.shape, generator=generator, device=labels.device)
    out = torch.full_like(labels, -1)
    for mask, k, value in ((pos, num_pos, 1), (neg, num_neg, 0)):
        # Random rank of each candidate among its row's candidates; keep the k lowest.
        prio = torch.where(mask, keys, torch.full_like(keys, 2.0))
        order = prio.argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(
            labels.shape[1], device=labels.device).expand_as(order))
        out[mask & (rank < k[:, None])] = value
    return out


def hflip_anchor_index(index: Tensor, feat_w: int, num_anchors: int) -> Tensor:
    """Map flattened anchor indices to those of the horizontally mirrored grid."""
    a = index % num_anchors
    cell = index // num_anchors
    y = cell // feat_w
    x = cell % feat_w
    return (y * feat_w + (feat_w - 1 - x)) * num_anchors + a


def hflip_anchor_targets(labels: Tensor, deltas: Tensor, feat_hw: tuple[int, int],
                         num_anchors: int) -> tuple[Tensor, Tensor]:
    """Targets of a horizontally flipped canvas, from those of the original: the grid is mirrored
    along x and dx changes sign (anchors are symmetric, so dy, dw, dh are unchanged).

    ``labels``: ``(..., H*W*A)``; ``deltas``: ``(..., H*W*A, 4)``.
    """
    h, w = feat_hw
    lead = labels.shape[:-1]
    labels = labels.reshape(*lead, h, w, num_anchors).flip(-2).reshape(*lead, -1)
    deltas = deltas.reshape(*lead, h, w, num_anchors, 4).flip(-3).reshape(*lead, -1, 4)
    deltas = deltas * deltas.new_tensor([-1.0, 1.0, 1.0, 1.0])
    return labels, deltas
