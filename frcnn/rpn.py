"""Region Proposal Network: head, proposal layer, loss (Ren et al. 2015, section 3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from .anchors import sample_anchor_labels
from .boxes import BoxCoder, clip_boxes
from .config import RPNConfig
from .errors import ConfigError
from .precision import float32_layer


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for A*2 scores and A*4 deltas; weights N(0, 0.01), biases 0."""

    def __init__(self, in_channels: int, mid_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors * 2, 1)
        self.bbox_pred = nn.Conv2d(mid_channels, num_anchors * 4, 1)
        self.num_anchors = num_anchors
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> float32 logits (B, H*W*A, 2), deltas (B, H*W*A, 4), in anchor order.

        The 3x3 conv runs in the autocast dtype; the two 1x1 predictors in float32 (see
        ``float32_layer``): objectness ranks the proposals for top-k and NMS."""
        b = features.shape[0]
        x = F.relu(self.conv(features))
        # (B, A*2, H, W) -> (B, H*W*A, 2) and (B, A*4, H, W) -> (B, H*W*A, 4)
        logits = float32_layer(self.cls_logits, x).permute(0, 2, 3, 1).reshape(b, -1, 2)
        deltas = float32_layer(self.bbox_pred, x).permute(0, 2, 3, 1).reshape(b, -1, 4)
        return logits, deltas


class ProposalLayer:
    """Deltas + scores -> proposals, per image: decode, clip, drop small, top-k, NMS, top-k."""

    def __init__(self, cfg: RPNConfig, box_coder: BoxCoder) -> None:
        self.cfg = cfg
        self.box_coder = box_coder

    @torch.no_grad()
    def __call__(self, anchors: Tensor, logits: Tensor, deltas: Tensor, canvas_hw: tuple[int, int],
                 training: bool) -> list[Tensor]:
        cfg = self.cfg
        pre_n = cfg.pre_nms_top_n_train if training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if training else cfg.post_nms_top_n_test
        b, n, _ = deltas.shape
        # Score = log-odds of "object": same order as the softmax probability, cheaper. Formed from
        # float32 logits: a difference of two bfloat16 values would tie many scores in top-k and NMS.
        logits = logits.float()
        scores = logits[..., 1] - logits[..., 0]
        boxes = self.box_coder.decode(deltas.reshape(-1, 4), anchors.repeat(b, 1)).reshape(b, n, 4)
        boxes = clip_boxes(boxes, *canvas_hw)
        out = []
        for i in range(b):
            out.append(self._one_image(boxes[i], scores[i], pre_n, post_n))
        return out

    def _one_image(self, bx: Tensor, sc: Tensor, pre_n: int, post_n: int) -> Tensor:
        """Drop boxes under ``min_size``, top-k, NMS, top-k; nothing waits for the host but NMS (its
        output's length depends on the data). A small box's score is -inf, so it ranks last, and
        it takes the best box's coordinates, so NMS suppresses it behind that box (IoU 1): the
        same proposals as removing small boxes first, without asking the host how many are left.
        (An image without any box of ``min_size`` keeps one: the best of its small boxes.)"""
        cfg = self.cfg
        wh = bx[:, 2:] - bx[:, :2]
        small = ~(wh >= cfg.min_size).all(dim=1)  # NaN boxes (a diverged model) count as small
        sc = sc.masked_fill(small, float("-inf"))
        if sc.numel() > pre_n:
            sc, top = sc.topk(pre_n)
            bx, small = bx[top], small[top]
        best = bx.index_select(0, sc.argmax().reshape(1))
        bx = torch.where(small[:, None], torch.where(best.isfinite(), best, 0.0), bx)
        keep = nms(bx, sc, cfg.nms_thresh)[:post_n]
        return bx[keep]


def rpn_loss(cfg: RPNConfig, logits: Tensor, deltas: Tensor, anchor_labels: Tensor, anchor_deltas: Tensor,
             feat_hw: tuple[int, int], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Cross entropy over a fresh sample of anchors + smooth L1 on the sampled positives.

    ``anchor_labels`` (B, N) int8 before sampling, ``anchor_deltas`` (B, N, 4).
    """
    sampled = sample_anchor_labels(anchor_labels, cfg.batch_size_per_image, cfg.positive_fraction, generator)
    b = sampled.shape[0]
    flat = sampled.reshape(-1)
    n_sampled = (flat >= 0).sum().clamp(min=1)
    loss_cls = F.cross_entropy(logits.reshape(-1, 2).float(), flat, ignore_index=-1, reduction="sum") / n_sampled
    pos = flat == 1
    # Every anchor's loss, the positives' kept: a mask, not an index of data-dependent length.
    per_anchor = F.smooth_l1_loss(deltas.reshape(-1, 4).float(), anchor_deltas.reshape(-1, 4).float(),
                                  beta=cfg.smooth_l1_beta, reduction="none").sum(1)
    loc_sum = torch.where(pos, per_anchor, 0.0).sum()
    if cfg.loc_normalizer == "locations":
        norm = float(b * feat_hw[0] * feat_hw[1])
    elif cfg.loc_normalizer == "positives":
        norm = pos.sum().clamp(min=1)
    elif cfg.loc_normalizer == "sampled":
        norm = n_sampled
    else:
        raise ConfigError(f"rpn.loc_normalizer {cfg.loc_normalizer!r}: locations, positives or sampled")
    return {"loss_rpn_cls": loss_cls, "loss_rpn_loc": cfg.loc_weight * loc_sum / norm}
