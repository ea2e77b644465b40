"""Detection evaluation: PASCAL VOC AP (devkit semantics) and COCO AP (pycocotools).

Data contract
-------------
Boxes are float ``[x1, y1, x2, y2]`` in 0-based continuous pixel coordinates of
the *original* image.  A VOC annotation's 1-based inclusive ``xmin..xmax`` maps to
``x1 = xmin - 1, x2 = xmax``.  Labels are ints ``1..C`` (``C = len(class_names)``,
label ``k`` is ``class_names[k - 1]``); 0 is background and is rejected here.

``ground_truth: Mapping[str, dict]``
    image_id -> ``{"boxes": (N, 4), "labels": (N,), "difficult": (N,) bool}``.
    Every evaluated image must appear here, even one without objects.  A missing
    ``"difficult"`` entry means "no difficult objects".
``detections: Mapping[str, dict]``
    image_id -> ``{"boxes": (M, 4), "scores": (M,), "labels": (M,)}``.  Images of
    ``ground_truth`` without an entry have no detections.  An image id that is not
    in ``ground_truth`` raises ``ValueError``.

Arrays may be numpy arrays, lists or CPU torch tensors (anything ``np.asarray``
accepts).

VOC (``evaluate_voc``) reproduces the devkit (``VOCevaldet`` as ported by
py-faster-rcnn's ``voc_eval``) exactly, with two documented, deliberate choices:

* Tied scores are ordered by a *stable* descending sort: detections keep their
  input order within an image and images follow ``ground_truth`` iteration
  order.  The devkit uses an unstable quicksort, so its tie order is arbitrary.
* A class without non-difficult ground truth has AP ``NaN`` (the devkit divides
  by zero) and is excluded from the mAP.  If every class is NaN, mAP is NaN.

COCO AP (``evaluate_coco``) is in ``frcnn/coco.py`` (pycocotools), on the same data contract.

This module must stay free of ray / mlflow / click imports (it is used inside
training workers and in plain scripts alike).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FlatDet", "FlatGT", "VocResult", "check_class_names", "evaluate_voc", "flatten_det", "flatten_gt", "voc_ap"]

# The devkit guards precision against 0/0 with float64 eps (py-faster-rcnn).
_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- #
# Input normalisation
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class FlatGT:
    """All ground truth of a split, concatenated in ``ground_truth`` order."""

    image_ids: list[str]
    boxes: np.ndarray  # (G, 4) float64, 0-based continuous
    labels: np.ndarray  # (G,) int64
    difficult: np.ndarray  # (G,) bool
    offsets: np.ndarray  # (num_images + 1,) row ranges per image


@dataclass(frozen=True)
class FlatDet:
    """All detections, concatenated in ``ground_truth`` image order, input order within."""

    image_index: np.ndarray  # (D,) int64 index into FlatGT.image_ids
    boxes: np.ndarray  # (D, 4) float64
    scores: np.ndarray  # (D,) float64
    labels: np.ndarray  # (D,) int64
    offsets: np.ndarray  # (num_images + 1,)


def _as_boxes(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).reshape(-1, 4)


def _as_1d(value: Any, dtype: type, n: int, what: str, image_id: str) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"image {image_id!r}: {what} has {arr.shape[0]} entries, boxes have {n}")
    return arr


def _check_labels(labels: np.ndarray, num_classes: int, what: str, image_id: str) -> None:
    bad = (labels < 1) | (labels > num_classes)
    if bad.any():
        raise ValueError(
            f"image {image_id!r}: {what} label {int(labels[bad][0])} outside 1..{num_classes}"
        )


def flatten_gt(ground_truth: Mapping[str, Mapping[str, Any]], num_classes: int) -> FlatGT:
    image_ids = list(ground_truth)
    boxes, labels, difficult, counts = [], [], [], [0]
    for image_id in image_ids:
        entry = ground_truth[image_id]
        b = _as_boxes(entry["boxes"])
        lab = _as_1d(entry["labels"], np.int64, len(b), "labels", image_id)
        diff_raw = entry.get("difficult")
        diff = (
            np.zeros(len(b), dtype=bool)
            if diff_raw is None
            else _as_1d(diff_raw, bool, len(b), "difficult", image_id)
        )
        _check_labels(lab, num_classes, "ground-truth", image_id)
        boxes.append(b)
        labels.append(lab)
        difficult.append(diff)
        counts.append(len(b))
    return FlatGT(
        image_ids=image_ids,
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        difficult=np.concatenate(difficult) if difficult else np.zeros(0, bool),
        offsets=np.cumsum(counts),
    )


def flatten_det(
    detections: Mapping[str, Mapping[str, Any]], gt: FlatGT, num_classes: int
) -> FlatDet:
    known = set(gt.image_ids)
    unknown = [image_id for image_id in detections if image_id not in known]
    if unknown:
        raise ValueError(
            f"{len(unknown)} detection image id(s) are not in ground_truth, e.g. {unknown[0]!r}"
        )
    index, boxes, scores, labels, counts = [], [], [], [], [0]
    for i, image_id in enumerate(gt.image_ids):
        entry = detections.get(image_id)
        if entry is None:
            counts.append(0)
            continue
        b = _as_boxes(entry["boxes"])
        s = _as_1d(entry["scores"], np.float64, len(b), "scores", image_id)
        lab = _as_1d(entry["labels"], np.int64, len(b), "labels", image_id)
        _check_labels(lab, num_classes, "detection", image_id)
        index.append(np.full(len(b), i, dtype=np.int64))
        boxes.append(b)
        scores.append(s)
        labels.append(lab)
        counts.append(len(b))
    return FlatDet(
        image_index=np.concatenate(index) if index else np.zeros(0, np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        scores=np.concatenate(scores) if scores else np.zeros(0),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        offsets=np.cumsum(counts),
    )


def check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    return names


def _nan_mean(values: Sequence[float]) -> float:
    # Explicit instead of np.nanmean: no RuntimeWarning when every value is NaN.
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


# --------------------------------------------------------------------------- #
# VOC
# --------------------------------------------------------------------------- #
@dataclass
class VocResult:
    """Per-class VOC evaluation.

    ``precision[c]`` / ``recall[c]`` are the devkit's cumulative curves over the
    class's detections in descending-score order (length ``num_det[c]``).  As in
    the devkit, a detection ignored because it hit a difficult object keeps the
    previous values (precision 0 if nothing counted yet); recall is NaN for a
    class without non-difficult ground truth.  ``num_gt`` counts non-difficult
    objects; ``num_det`` counts all submitted detections of the class.
    """

    ap: dict[str, float]
    map: float
    precision: dict[str, np.ndarray] = field(repr=False)
    recall: dict[str, np.ndarray] = field(repr=False)
    num_gt: dict[str, int]
    num_det: dict[str, int]

    def as_rows(self) -> list[tuple[str, int, int, float]]:
        """Per-class table rows ``(class, num_gt, num_det, ap)`` in class order."""
        return [(c, self.num_gt[c], self.num_det[c], self.ap[c]) for c in self.ap]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a PR curve, exactly as the VOC devkit / py-faster-rcnn ``voc_ap``.

    ``use_07_metric=True``: VOC2007 11-point interpolation, mean over
    ``t in np.arange(0, 1.1, 0.1)`` of ``max(precision[recall >= t])`` (0 when no
    recall reaches t).  The thresholds are deliberately the arange floats the
    reference uses (e.g. 0.30000000000000004), so recall exactly 0.3 does not
    reach "0.3".
    ``use_07_metric=False``: VOC2010+ area under the monotone (right-to-left
    running max) precision envelope, summed where recall changes.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = rec >= t
            ap += (float(np.max(prec[reached])) if reached.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    # Running max from the right == the devkit's backward loop, vectorised.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _voc_iou(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(M, N) IoU in the devkit's 1-based inclusive convention.

    Boxes are converted back to VOC pixels (``xmin = x1 + 1, xmax = x2``) and the
    devkit's "+1" widths are used; the operation order mirrors py-faster-rcnn so
    results agree bit-for-bit with a scalar port.
    """
    d = det_boxes.copy()
    g = gt_boxes.copy()
    d[:, :2] += 1.0
    g[:, :2] += 1.0
    ixmin = np.maximum(g[None, :, 0], d[:, None, 0])
    iymin = np.maximum(g[None, :, 1], d[:, None, 1])
    ixmax = np.minimum(g[None, :, 2], d[:, None, 2])
    iymax = np.minimum(g[None, :, 3], d[:, None, 3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    det_area = (d[:, 2] - d[:, 0] + 1.0) * (d[:, 3] - d[:, 1] + 1.0)
    gt_area = (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0)
    uni = det_area[:, None] + gt_area[None, :] - inters
    return inters / uni


def _best_gt_per_detection(det: FlatDet, gt: FlatGT) -> tuple[np.ndarray, np.ndarray]:
    """For each detection: max IoU over same-class GT of its image, and that GT's row.

    The devkit's ``jmax`` is the arg-max over *all* GT of the class in the image,
    matched or not; it never depends on the matching state, so it can be computed
    up front, once per image for all classes (other-class pairs masked to -inf).
    Returns ``(ovmax, gt_row)``; ``ovmax = -inf`` / ``gt_row = -1`` without such GT.
    """
    ovmax = np.full(len(det.scores), -np.inf)
    gt_row = np.full(len(det.scores), -1, dtype=np.int64)
    for i in range(len(gt.image_ids)):
        d0, d1 = det.offsets[i], det.offsets[i + 1]
        g0, g1 = gt.offsets[i], gt.offsets[i + 1]
        if d0 == d1 or g0 == g1:
            continue
        iou = _voc_iou(det.boxes[d0:d1], gt.boxes[g0:g1])
        iou[det.labels[d0:d1, None] != gt.labels[None, g0:g1]] = -np.inf
        j = np.argmax(iou, axis=1)  # first maximum, like the devkit's argmax / max
        ovmax[d0:d1] = iou[np.arange(d1 - d0), j]
        gt_row[d0:d1] = np.where(np.isfinite(ovmax[d0:d1]), g0 + j, -1)
    return ovmax, gt_row


def _class_tp_fp(
    ovmax: np.ndarray, gt_row: np.ndarray, difficult: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Devkit TP/FP flags for one class's detections, already in score order.

    ``ovmax > thr`` on a difficult GT: neither TP nor FP.  On a non-difficult GT:
    TP for the first (highest-ranked) such detection, FP (duplicate) afterwards.
    Otherwise FP.  The "first claimant wins" rule is exactly the devkit's
    sequential ``R['det']`` flag loop.
    """
    hit = ovmax > iou_threshold  # strict, as py-faster-rcnn's `ovmax > ovthresh`
    hit_difficult = np.zeros_like(hit)
    hit_difficult[hit] = difficult[gt_row[hit]]
    candidate = hit & ~hit_difficult
    tp = np.zeros(len(ovmax))
    cand_idx = np.flatnonzero(candidate)
    _, first = np.unique(gt_row[cand_idx], return_index=True)
    tp[cand_idx[first]] = 1.0
    fp = (~hit_difficult).astype(np.float64) - tp
    return tp, fp


def evaluate_voc(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
) -> VocResult:
    """PASCAL VOC detection AP per class, with VOC devkit semantics.

    Per class: detections are sorted by descending score (stable, see module
    docstring).  Each detection takes the GT of the same class in its image with
    maximum IoU (1-based inclusive devkit IoU) among *all* such GT, matched or
    not.  If that IoU is ``> iou_threshold`` (strictly): a difficult GT makes the
    detection ignored (neither TP nor FP); a not-yet-matched GT makes it a TP and
    marks the GT matched; an already matched GT makes it a FP (duplicate) -- even
    if another unmatched GT also overlaps above the threshold, exactly like the
    devkit.  Otherwise it is a FP.

    AP is NaN for a class with no non-difficult GT (excluded from ``map``), 0 for
    a class with GT but no detections.  Empty ``ground_truth`` gives NaN mAP.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    names = check_class_names(class_names)
    gt = flatten_gt(ground_truth, len(names))
    det = flatten_det(detections, gt, len(names))
    ovmax, gt_row = _best_gt_per_detection(det, gt)

    ap: dict[str, float] = {}
    precision: dict[str, np.ndarray] = {}
    recall: dict[str, np.ndarray] = {}
    num_gt: dict[str, int] = {}
    num_det: dict[str, int] = {}
    for label, name in enumerate(names, start=1):
        npos = int(np.sum((gt.labels == label) & ~gt.difficult))
        sel = np.flatnonzero(det.labels == label)
        # Stable descending sort: ties keep concatenation (= documented) order.
        sel = sel[np.argsort(-det.scores[sel], kind="stable")]
        tp, fp = _class_tp_fp(ovmax[sel], gt_row[sel], gt.difficult, iou_threshold)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        prec = tp / np.maximum(tp + fp, _EPS)
        if npos > 0:
            rec = tp / float(npos)
            ap[name] = voc_ap(rec, prec, use_07_metric)
        else:
            rec = np.full(len(sel), np.nan)
            ap[name] = math.nan
        precision[name], recall[name] = prec, rec
        num_gt[name], num_det[name] = npos, len(sel)
    return VocResult(
        ap=ap,
        map=_nan_mean(list(ap.values())),
        precision=precision,
        recall=recall,
        num_gt=num_gt,
        num_det=num_det,
    )
