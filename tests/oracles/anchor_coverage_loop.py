"""Test oracle for ``frcnn.anchor_coverage``: the best anchor IoU of each box by plain loops."""

from __future__ import annotations

import numpy as np


def best_iou_loop(anchors: np.ndarray, boxes: np.ndarray, h: int, w: int) -> list[float]:
    """Each box's best IoU with an anchor inside the ``h`` x ``w`` canvas: every inside anchor
    against every box, one at a time, in Python floats."""
    out = []
    for b in boxes.tolist():
        best = 0.0
        for a in anchors.tolist():
            if a[0] < 0 or a[1] < 0 or a[2] > w or a[3] > h:
                continue
            iw = max(0.0, min(b[2], a[2]) - max(b[0], a[0]))
            ih = max(0.0, min(b[3], a[3]) - max(b[1], a[1]))
            inter = iw * ih
            best = max(best, inter / ((b[2] - b[0]) * (b[3] - b[1]) + (a[2] - a[0]) * (a[3] - a[1]) - inter))
        out.append(best)
    return out
