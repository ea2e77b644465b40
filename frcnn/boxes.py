"""Box parameterisation (Ren et al. 2015, eq. 2) and small box utilities.

Tensor contract, said once for the whole package: boxes are ``FloatTensor[N, 4]`` in
``[x1, y1, x2, y2]`` absolute pixels with ``0 <= x1 < x2 <= W``; labels are ``Int64Tensor[N]``,
1..C for objects, 0 for background.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a larger delta overflows or yields absurd boxes (torchvision uses the same bound).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encode boxes relative to reference boxes, and decode deltas back.

    t_x = w_x (x - x_a) / w_a,  t_y = w_y (y - y_a) / h_a,
    t_w = w_w log(w / w_a),     t_h = w_h log(h / h_a)

    with (x, y) box centres and (w_x, w_y, w_w, w_h) per-stage weights: (1, 1, 1, 1) for the RPN,
    (10, 10, 5, 5) for the RoI head (torchvision's values, which scale the head's targets to unit
    variance).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """(N, 4) target boxes, (N, 4) reference boxes -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        boxes = boxes.float()
        reference = reference.float()
        rw = reference[:, 2] - reference[:, 0]
        rh = reference[:, 3] - reference[:, 1]
        rx = reference[:, 0] + 0.5 * rw
        ry = reference[:, 1] + 0.5 * rh
        bw = boxes[:, 2] - boxes[:, 0]
        bh = boxes[:, 3] - boxes[:, 1]
        bx = boxes[:, 0] + 0.5 * bw
        by = boxes[:, 1] + 0.5 * bh
        return torch.stack(
            (wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)),
            dim=1,
        )

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """(N, 4*K) deltas against (N, 4) reference boxes -> (N, 4*K) boxes.

        Decoding runs in float32 even under autocast: exp() of half-precision deltas loses the box.
        """
        wx, wy, ww, wh = self.weights
        deltas = deltas.float()
        reference = reference.to(deltas.dtype)
        rw = reference[:, 2:3] - reference[:, 0:1]
        rh = reference[:, 3:4] - reference[:, 1:2]
        rx = reference[:, 0:1] + 0.5 * rw
        ry = reference[:, 1:2] + 0.5 * rh
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.clip)
        cx = dx * rw + rx
        cy = dy * rh + ry
        w = torch.exp(dw) * rw
        h = torch.exp(dh) * rh
        out = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=2)
        return out.reshape(deltas.shape[0], -1)  # (N, K, 4) -> (N, 4K)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """Clip ``(..., 4)`` boxes to the image ``[0, width] x [0, height]``."""
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Mirror boxes about the vertical axis of an image ``width`` wide."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
