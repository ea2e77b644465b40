"""Test-only oracle: a plain-loop port of the walkthrough's anchors and anchor targets.

Source: the Faster R-CNN walkthrough notebook the detector follows, cells In [95]..In [98]
(anchor generation) and In [99]..In [115] (anchor labels and regression targets). The port keeps the walkthrough's
structure -- Python loops, one anchor and one box at a time -- and changes only what the project
asked to change:

- coordinates: the walkthrough's ``[y1, x1, y2, x2]`` become ``[x1, y1, x2, y2]`` and its deltas
  ``(dy, dx, dh, dw)`` become ``(dx, dy, dw, dh)``;
- anchor order: the walkthrough enumerates cells x-major (``for x: for y:``); ``x_major_to_y_major``
  gives the permutation to the head's y-major order;
- its flaw: a box whose best IoU is 0 makes no anchor positive, and an image without boxes makes
  every inside anchor negative;
- IoU is computed with Python floats (float64) so that equal overlaps compare equal.

Nothing here imports ``frcnn``: it is an independent re-derivation to compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


# ---- anchors: In [95] .. In [98] ---------------------------------------------------------------
def walkthrough_anchor_base_yxyx(sub_sample=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    """In [95]: the 9 anchors of the first cell (centre (8, 8)), ``[y1, x1, y2, x2]``."""
    ctr_y = sub_sample / 2.0
    ctr_x = sub_sample / 2.0
    out = []
    for i in range(len(ratios)):
        for j in range(len(anchor_scales)):
            h = sub_sample * anchor_scales[j] * math.sqrt(ratios[i])
            w = sub_sample * anchor_scales[j] * math.sqrt(1.0 / ratios[i])
            out.append([ctr_y - h / 2.0, ctr_x - w / 2.0, ctr_y + h / 2.0, ctr_x + w / 2.0])
    return out


def walkthrough_anchors_yxyx(feat_h, feat_w, sub_sample=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    """In [96]..In [98], generalised to a ``feat_h x feat_w`` map: x-major, ``[y1, x1, y2, x2]``."""
    ctr_x = [sub_sample * (k + 1) for k in range(feat_w)]  # np.arange(16, (fe_size+1)*16, 16)
    ctr_y = [sub_sample * (k + 1) for k in range(feat_h)]
    ctr = []
    for x in range(len(ctr_x)):  # In [97]: x outer, y inner
        for y in range(len(ctr_y)):
            ctr.append((ctr_y[y] - sub_sample / 2, ctr_x[x] - sub_sample / 2))
    anchors = []
    for cy, cx in ctr:  # In [98]
        for i in range(len(ratios)):
            for j in range(len(anchor_scales)):
                h = sub_sample * anchor_scales[j] * math.sqrt(ratios[i])
                w = sub_sample * anchor_scales[j] * math.sqrt(1.0 / ratios[i])
                anchors.append([cy - h / 2.0, cx - w / 2.0, cy + h / 2.0, cx + w / 2.0])
    return anchors


def yxyx_to_xyxy(boxes):
    return [[b[1], b[0], b[3], b[2]] for b in boxes]


def x_major_to_y_major(feat_h, feat_w, num_anchors):
    """``perm`` with ``y_major[i] = x_major[perm[i]]``: y-major index ``(y*W + x)*A + a`` comes
    from x-major index ``(x*H + y)*A + a``."""
    perm = []
    for y in range(feat_h):
        for x in range(feat_w):
            for a in range(num_anchors):
                perm.append((x * feat_h + y) * num_anchors + a)
    return perm


def walkthrough_anchors_xyxy_ymajor(feat_h, feat_w, sub_sample=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    xm = yxyx_to_xyxy(walkthrough_anchors_yxyx(feat_h, feat_w, sub_sample, ratios, anchor_scales))
    perm = x_major_to_y_major(feat_h, feat_w, len(ratios) * len(anchor_scales))
    return [xm[p] for p in perm]


# ---- anchor targets: In [99] .. In [115] -------------------------------------------------------
@dataclass
class PortTargets:
    labels: list          # per anchor: -1 / 0 / 1
    matched: list         # per anchor: argmax box index (inside anchors), -1 outside or no boxes
    deltas: list          # per anchor: [dx, dy, dw, dh] (computed for every inside anchor), else zeros
    inside_index: list
    gt_max_ious: list     # per box: best IoU over inside anchors
    gt_argmax_ious: list  # inside positions (into inside_index) that are best for some box (>0)
    gt_best_counts: list  # per box: how many inside anchors tie for its best IoU (0 if it is 0)


def _iou_loop(anchor, box):
    """In [103], in [x1, y1, x2, y2]."""
    xa1, ya1, xa2, ya2 = anchor
    anchor_area = (ya2 - ya1) * (xa2 - xa1)
    xb1, yb1, xb2, yb2 = box
    box_area = (yb2 - yb1) * (xb2 - xb1)
    inter_x1 = max(xb1, xa1)
    inter_y1 = max(yb1, ya1)
    inter_x2 = min(xb2, xa2)
    inter_y2 = min(yb2, ya2)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        iter_area = (inter_y2 - inter_y1) * (inter_x2 - inter_x1)
        return iter_area / (anchor_area + box_area - iter_area)
    return 0.0


def walkthrough_anchor_targets(anchors, boxes, canvas_hw, pos_iou_threshold=0.7, neg_iou_threshold=0.3):
    """``anchors``: list of ``[x1, y1, x2, y2]`` (any order: labels come back in that order);
    ``boxes``: list of ``[x1, y1, x2, y2]``; ``canvas_hw``: ``(height, width)``."""
    anchors = [[float(v) for v in a] for a in anchors]
    boxes = [[float(v) for v in b] for b in boxes]
    height, width = canvas_hw
    n = len(anchors)

    # In [100]: anchors that do not cross the border
    inside_index = [k for k, a in enumerate(anchors)
                    if a[0] >= 0 and a[1] >= 0 and a[2] <= width and a[3] <= height]
    # In [101]
    label = [-1] * len(inside_index)
    valid_anchor_boxes = [anchors[k] for k in inside_index]  # In [102]

    anchor_labels = [-1] * n
    anchor_matched = [-1] * n
    anchor_locations = [[0.0, 0.0, 0.0, 0.0] for _ in range(n)]

    if not boxes:  # fixed flaw: nothing to match, every inside anchor is background
        for k in inside_index:
            anchor_labels[k] = 0
        return PortTargets(anchor_labels, anchor_matched, anchor_locations, inside_index, [], [], [])

    # In [103]
    ious = [[_iou_loop(a, b) for b in boxes] for a in valid_anchor_boxes]

    # In [104]: best IoU of each box
    gt_max_ious = []
    for j in range(len(boxes)):
        best = 0.0
        for i in range(len(valid_anchor_boxes)):
            if ious[i][j] > best:
                best = ious[i][j]
        gt_max_ious.append(best)

    # In [105]: best box of each anchor (first one on ties, as np.argmax)
    argmax_ious, max_ious = [], []
    for i in range(len(valid_anchor_boxes)):
        best_j, best = 0, ious[i][0]
        for j in range(1, len(boxes)):
            if ious[i][j] > best:
                best_j, best = j, ious[i][j]
        argmax_ious.append(best_j)
        max_ious.append(best)

    # In [106]: np.where(ious == gt_max_ious)[0] -- every anchor tied for a box's best, ties included;
    # fixed flaw: a box whose best IoU is 0 has no best anchor.
    gt_argmax_ious = []
    gt_best_counts = [0] * len(boxes)
    for i in range(len(valid_anchor_boxes)):
        best_for_some = False
        for j in range(len(boxes)):
            if gt_max_ious[j] > 0 and ious[i][j] == gt_max_ious[j]:
                gt_best_counts[j] += 1
                best_for_some = True
        if best_for_some:
            gt_argmax_ious.append(i)

    # In [107]
    for i in range(len(valid_anchor_boxes)):
        if max_ious[i] < neg_iou_threshold:
            label[i] = 0
    for i in gt_argmax_ious:
        label[i] = 1
    for i in range(len(valid_anchor_boxes)):
        if max_ious[i] >= pos_iou_threshold:
            label[i] = 1

    # In [111]..In [113]: regression targets of every inside anchor against its best box
    eps = 2.220446049250313e-16  # np.finfo(float64).eps
    for num, k in enumerate(inside_index):
        xa1, ya1, xa2, ya2 = valid_anchor_boxes[num]
        xb1, yb1, xb2, yb2 = boxes[argmax_ious[num]]
        h = max(ya2 - ya1, eps)
        w = max(xa2 - xa1, eps)
        ctr_y = ya1 + 0.5 * h
        ctr_x = xa1 + 0.5 * w
        base_height = yb2 - yb1
        base_width = xb2 - xb1
        base_ctr_y = yb1 + 0.5 * base_height
        base_ctr_x = xb1 + 0.5 * base_width
        dy = (base_ctr_y - ctr_y) / h
        dx = (base_ctr_x - ctr_x) / w
        dh = math.log(base_height / h)
        dw = math.log(base_width / w)
        anchor_locations[k] = [dx, dy, dw, dh]  # walkthrough: (dy, dx, dh, dw)

    # In [114], In [115]
    for num, k in enumerate(inside_index):
        anchor_labels[k] = label[num]
        anchor_matched[k] = argmax_ious[num]
    return PortTargets(anchor_labels, anchor_matched, anchor_locations, inside_index, gt_max_ious,
                       gt_argmax_ious, gt_best_counts)
