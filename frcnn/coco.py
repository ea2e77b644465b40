"""COCO box AP of detections through pycocotools' ``COCOeval``, two ways:

- ``evaluate_coco``: on ``frcnn.evaluation``'s data contract (0-based xyxy original pixels, labels
  1..C, ``difficult`` flags), for any dataset;
- ``coco_results`` + ``evaluate_coco_results``: a standard COCO results list (original image and
  category ids, ``[x, y, w, h]``) scored against the original instances document, crowd handled
  by COCOeval itself; rescoring the same results with pycocotools by hand gives the same numbers.

This module must stay free of ray / mlflow / click imports.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .evaluation import FlatDet, FlatGT, check_class_names, flatten_det, flatten_gt

__all__ = ["coco_results", "evaluate_coco", "evaluate_coco_results"]

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
    gt: FlatGT, det: FlatDet, names: list[str]
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
    names = check_class_names(class_names)
    gt = flatten_gt(ground_truth, len(names))
    det = flatten_det(detections, gt, len(names))
    if not names or not (gt.labels.size and (~gt.difficult).any()):
        # Nothing to score against; COCOeval would report -1 everywhere anyway.
        return {k: math.nan for k in _COCO_KEYS}

    from pycocotools.cocoeval import COCOeval

    gt_dataset, det_dataset = _coco_datasets(gt, det, names)
    coco_eval = COCOeval(_coco_api(gt_dataset), _coco_api(det_dataset), iouType="bbox")
    return _summary(coco_eval)


def coco_results(detections: Mapping[str, Mapping[str, Any]], image_ids: Mapping[str, Any],
                 category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Detections per image (``boxes`` (N, 4) xyxy, ``scores``, ``labels`` 1..C) -> the COCO
    results format: ``{"image_id": image_ids[key], "category_id": category_ids[label - 1],
    "bbox": [x, y, w, h], "score"}``, best first per image. Images not in ``image_ids`` are left out."""
    out: list[dict[str, Any]] = []
    for key, det in detections.items():
        if key not in image_ids:
            continue
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        xywh = _xywh(boxes)
        for k in np.argsort(-scores, kind="stable"):
            out.append({"image_id": image_ids[key], "category_id": int(category_ids[int(labels[k]) - 1]),
                        "bbox": [round(float(v), 3) for v in xywh[k]], "score": round(float(scores[k]), 5)})
    return out


def evaluate_coco_results(instances: dict[str, Any], results: list[dict[str, Any]],
                          category_ids: Sequence[int] | None = None) -> dict[str, float]:
    """``COCOeval`` (bbox, default parameters) of ``results`` against the ``instances`` document
    (all its images; ``category_ids``: the categories scored, default all). Returns ``map``,
    ``ap50``, ``ap75``, ``ap_small|medium|large`` (``stats[0:6]``; -1 as NaN), which is what
    ``COCO(file).loadRes(results)`` through ``COCOeval`` gives by hand."""
    from pycocotools.cocoeval import COCOeval

    gt = _coco_api(instances)
    if results:
        with _quiet():
            dt = gt.loadRes(results)
    else:  # loadRes refuses an empty list: no detections at all
        dt = _coco_api({"images": instances["images"], "categories": instances["categories"], "annotations": []})
    coco_eval = COCOeval(gt, dt, iouType="bbox")
    if category_ids is not None:
        coco_eval.params.catIds = sorted(int(c) for c in category_ids)
    return _summary(coco_eval)


def _summary(coco_eval: Any) -> dict[str, float]:
    """Run a configured ``COCOeval`` quietly; its headline numbers by name (NaN where COCO has none)."""
    with _quiet():
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats[: len(_COCO_KEYS)]]
    return {k: (math.nan if s < 0 else s) for k, s in zip(_COCO_KEYS, stats)}
