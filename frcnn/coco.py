"""COCO box AP of detections through pycocotools' ``COCOeval``, on ``frcnn.evaluation``'s data
contract (0-based xyxy original pixels, labels 1..C, ``difficult`` flags).

This module must stay free of ray / mlflow / click imports.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .evaluation import _check_class_names, _FlatDet, _FlatGT, _flatten_det, _flatten_gt

__all__ = ["evaluate_coco"]

_COCO_KEYS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # pycocotools prints progress unconditionally; keep worker logs clean.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack(
        [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1
    ).reshape(-1, 4)


def _coco_api(dataset: dict[str, list[dict[str, Any]]]) -> Any:
    from pycocotools.coco import COCO  # local: keep module import cheap

    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _coco_datasets(
    gt: _FlatGT, det: _FlatDet, names: list[str]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    images = [{"id": i + 1} for i in range(len(gt.image_ids))]
    categories = [{"id": k, "name": n} for k, n in enumerate(names, start=1)]
    gt_xywh = _xywh(gt.boxes)
    gt_image = np.repeat(np.arange(len(gt.image_ids)), np.diff(gt.offsets))
    gt_anns = [
        {
            "id": r + 1,
            "image_id": int(gt_image[r]) + 1,
            "category_id": int(gt.labels[r]),
            "bbox": gt_xywh[r].tolist(),
            "area": float(gt_xywh[r, 2] * gt_xywh[r, 3]),
            "iscrowd": int(gt.difficult[r]),
        }
        for r in range(len(gt.labels))
    ]
    det_xywh = _xywh(det.boxes)
    # Built directly rather than via COCO.loadRes, which crashes on an empty list;
    # fields are those loadRes would set for bbox results.
    det_anns = [
        {
            "id": r + 1,
            "image_id": int(det.image_index[r]) + 1,
            "category_id": int(det.labels[r]),
            "bbox": det_xywh[r].tolist(),
            "score": float(det.scores[r]),
            "area": float(det_xywh[r, 2] * det_xywh[r, 3]),
            "iscrowd": 0,
        }
        for r in range(len(det.labels))
    ]
    gt_dataset = {"images": images, "categories": categories, "annotations": gt_anns}
    det_dataset = {"images": list(images), "categories": categories, "annotations": det_anns}
    return gt_dataset, det_dataset


def evaluate_coco(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
) -> dict[str, float]:
    """COCO box AP via pycocotools ``COCOeval`` (``iouType="bbox"``, default params).

    Returns ``map`` (AP@[.5:.95]), ``ap50``, ``ap75``, ``ap_small``, ``ap_medium``,
    ``ap_large`` -- ``COCOeval.stats[0:6]``.  The GT/result objects are built in
    memory: image ids are 1..N in ``ground_truth`` order, category ids are the
    labels, ``bbox = [x1, y1, x2 - x1, y2 - y1]`` and ``area = w * h`` of the
    0-based box (areas pick the small/medium/large bucket).

    Difficult objects are given ``iscrowd=1``: COCOeval then ignores them and any
    detection matched to them (neither TP nor FP), the closest COCO analogue of
    VOC's difficult flag.  Note crowd matching uses intersection / detection-area
    and a crowd region may absorb several detections.

    COCO defaults apply: at most 100 detections per image (highest scores), and
    a metric with no ground truth in its range is reported by COCOeval as -1,
    returned here as NaN (so empty ground truth gives all NaN).
    """
    names = _check_class_names(class_names)
    gt = _flatten_gt(ground_truth, len(names))
    det = _flatten_det(detections, gt, len(names))
    if not names or not (gt.labels.size and (~gt.difficult).any()):
        # Nothing to score against; COCOeval would report -1 everywhere anyway.
        return {k: math.nan for k in _COCO_KEYS}

    from pycocotools.cocoeval import COCOeval

    gt_dataset, det_dataset = _coco_datasets(gt, det, names)
    coco_eval = COCOeval(_coco_api(gt_dataset), _coco_api(det_dataset), iouType="bbox")
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats[: len(_COCO_KEYS)]]
    return {k: (math.nan if s < 0 else s) for k, s in zip(_COCO_KEYS, stats)}
