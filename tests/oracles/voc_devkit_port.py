"""Test oracle: a plain-Python port of py-faster-rcnn's ``voc_eval`` / ``voc_ap``.

Deliberately independent of ``frcnn.evaluation``: no numpy, scalar loops, and
the data in the devkit's own shapes -- VOC 1-based inclusive boxes, per-image
object records, and one "detection file" (list of lines) per class.  It follows
the reference procedure line by line:

* ``class_recs[image] = {bbox, difficult, det}`` for the class, ``npos`` counts
  non-difficult objects;
* detections sorted by descending confidence, then for each one the max IoU
  (``+1`` widths) over the class's objects in its image;
* ``ovmax > ovthresh``: difficult -> ignored, unmatched -> TP (flag it),
  matched -> FP; else FP;
* cumulative precision with float64-eps guard, ``voc_ap`` 11-point or all-point.

Two deviations, shared with ``frcnn.evaluation`` by contract: the sort is
stable (Python's ``sorted``) so tie order is defined, and a class with
``npos == 0`` returns AP NaN instead of dividing by zero.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TypedDict

EPS = sys.float_info.epsilon  # == np.finfo(np.float64).eps


class VocObject(TypedDict):
    name: str
    bbox: list[float]  # [xmin, ymin, xmax, ymax], 1-based inclusive
    difficult: int


# One line of a devkit detection file: image id, confidence, xmin, ymin, xmax, ymax.
DetLine = tuple[str, float, float, float, float, float]


def voc_ap(rec: Sequence[float], prec: Sequence[float], use_07_metric: bool = False) -> float:
    if use_07_metric:
        ap = 0.0
        # np.arange(0., 1.1, 0.1) yields exactly k * 0.1 for these k.
        for t in [k * 0.1 for k in range(11)]:
            reached = [p for r, p in zip(rec, prec) if r >= t]
            p = max(reached) if reached else 0.0
            ap = ap + p / 11.0
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    ap = 0.0
    for i in range(len(mrec) - 1):
        if mrec[i + 1] != mrec[i]:
            ap += (mrec[i + 1] - mrec[i]) * mpre[i + 1]
    return ap


def voc_eval(
    detlines: Sequence[DetLine],
    recs: dict[str, list[VocObject]],
    imagenames: Sequence[str],
    classname: str,
    ovthresh: float = 0.5,
    use_07_metric: bool = False,
) -> tuple[list[float], list[float], float]:
    """Returns ``(rec, prec, ap)`` for one class, as py-faster-rcnn's ``voc_eval``."""
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        R = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = [obj["bbox"] for obj in R]
        difficult = [bool(obj["difficult"]) for obj in R]
        det = [False] * len(R)
        npos = npos + sum(1 for d in difficult if not d)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    image_ids = [x[0] for x in detlines]
    confidence = [x[1] for x in detlines]
    BB = [list(x[2:]) for x in detlines]

    # sort by confidence (stable: ties keep file order)
    sorted_ind = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    BB = [BB[i] for i in sorted_ind]
    image_ids = [image_ids[i] for i in sorted_ind]

    nd = len(image_ids)
    tp = [0.0] * nd
    fp = [0.0] * nd
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d]
        ovmax = -math.inf
        jmax = -1
        for j, bbgt in enumerate(R["bbox"]):
            ixmin = max(bbgt[0], bb[0])
            iymin = max(bbgt[1], bb[1])
            ixmax = min(bbgt[2], bb[2])
            iymax = min(bbgt[3], bb[3])
            iw = max(ixmax - ixmin + 1.0, 0.0)
            ih = max(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (bbgt[2] - bbgt[0] + 1.0) * (bbgt[3] - bbgt[1] + 1.0)
                - inters
            )
            ov = inters / uni
            if ov > ovmax:  # strict: first maximum wins, like np.argmax
                ovmax = ov
                jmax = j

        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    # compute precision recall
    cum_fp, cum_tp, acc_fp, acc_tp = [], [], 0.0, 0.0
    for d in range(nd):
        acc_fp += fp[d]
        acc_tp += tp[d]
        cum_fp.append(acc_fp)
        cum_tp.append(acc_tp)
    prec = [t / max(t + f, EPS) for t, f in zip(cum_tp, cum_fp)]
    if npos == 0:
        return [math.nan] * nd, prec, math.nan
    rec = [t / float(npos) for t in cum_tp]
    return rec, prec, voc_ap(rec, prec, use_07_metric)
