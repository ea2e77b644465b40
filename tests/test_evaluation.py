"""Tests for frcnn.evaluation (VOC + COCO AP) and frcnn.visualize.

Hand cases pin devkit semantics with answers computed in the comments; a
randomised comparison against ``tests/oracles/voc_devkit_port.py`` (an independent
scalar port of py-faster-rcnn's ``voc_eval``) covers the general case; COCO
numbers are checked against a COCOeval run built independently here.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import pytest
from PIL import Image

from frcnn.coco import evaluate_coco
from frcnn.evaluation import VocResult, evaluate_voc, voc_ap
from frcnn.visualize import draw_detections, image_grid, plot_pr_curves
from tests.oracles import voc_devkit_port as port


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def gt_entry(
    boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None
) -> dict[str, Any]:
    n = len(labels)
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult if difficult is not None else [False] * n, dtype=bool),
    }


def det_entry(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, Any]:
    n = len(labels)
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(n, 4),
        "scores": np.asarray(scores, dtype=np.float64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


BOTH_METRICS = pytest.mark.parametrize("use_07", [False, True], ids=["allpoint", "07"])
A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 40.0, 50.0]
FAR = [100.0, 100.0, 120.0, 120.0]


# --------------------------------------------------------------------------- #
# voc_ap
# --------------------------------------------------------------------------- #
def test_voc_ap_hand_curve_differs_between_metrics() -> None:
    # 3 GT; ranked TP, FP, TP, FP, TP.
    rec = np.array([1, 1, 2, 2, 3]) / 3
    prec = np.array([1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    # all-point: envelope 1 on (0,1/3], 2/3 on (1/3,2/3], 3/5 on (2/3,1].
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 11-point: t=0,.1,.2,.3 -> 1; t=.4,.5,.6 -> 2/3; t=.7..1.0 -> 3/5.
    expected_07 = (4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(expected_07)


@BOTH_METRICS
def test_voc_ap_empty_curve_is_zero(use_07: bool) -> None:
    assert voc_ap(np.zeros(0), np.zeros(0), use_07) == 0.0


def test_voc_ap_07_uses_reference_arange_thresholds() -> None:
    # Recall exactly 0.3 does not reach the reference's 0.30000000000000004 point.
    assert voc_ap(np.array([0.3]), np.array([1.0]), True) == pytest.approx(3 / 11)


# --------------------------------------------------------------------------- #
# evaluate_voc: hand cases
# --------------------------------------------------------------------------- #
@BOTH_METRICS
def test_perfect_detections(use_07: bool) -> None:
    gt = {"a": gt_entry([A, B], [1, 2]), "b": gt_entry([B], [1])}
    det = {"a": det_entry([A, B], [0.9, 0.8], [1, 2]), "b": det_entry([B], [0.7], [1])}
    res = evaluate_voc(det, gt, ["cat", "dog"], use_07_metric=use_07)
    # approx: the devkit's 11-point sum of eleven 1/11 terms is 1.0000000000000002.
    assert res.ap == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert res.map == pytest.approx(1.0)
    assert res.num_gt == {"cat": 2, "dog": 1} and res.num_det == {"cat": 2, "dog": 1}
    np.testing.assert_allclose(res.recall["cat"], [0.5, 1.0])
    np.testing.assert_allclose(res.precision["cat"], [1.0, 1.0])
    assert res.as_rows() == [("cat", 2, 2, res.ap["cat"]), ("dog", 1, 1, res.ap["dog"])]


@BOTH_METRICS
def test_all_false_positives(use_07: bool) -> None:
    gt = {"a": gt_entry([A], [1])}
    # Far away, and a perfect box with the wrong class: both FPs for their class.
    det = {"a": det_entry([FAR, A], [0.9, 0.8], [1, 2])}
    res = evaluate_voc(det, gt, ["cat", "dog"], use_07_metric=use_07)
    assert res.ap["cat"] == 0.0
    np.testing.assert_array_equal(res.precision["cat"], [0.0])
    assert math.isnan(res.ap["dog"])  # no dog GT
    assert res.map == 0.0


def test_duplicate_detection_is_false_positive() -> None:
    gt = {"a": gt_entry([A, B], [1, 1])}
    det = {"a": det_entry([A, [0.5, 0, 10, 10], B], [0.9, 0.8, 0.7], [1, 1, 1])}
    # Ranked: TP(A), FP(dup of A), TP(B) -> rec [.5, .5, 1], prec [1, 1/2, 2/3].
    res = evaluate_voc(det, gt, ["cat"])
    np.testing.assert_allclose(res.recall["cat"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(res.precision["cat"], [1.0, 0.5, 2 / 3])
    # all-point: envelope 1 on (0, .5], 2/3 on (.5, 1] -> 1/2 + 1/3 = 5/6.
    assert res.ap["cat"] == pytest.approx(5 / 6)
    # 11-point: t in 0..0.5 (6 points) -> 1; t in .6..1 (5 points) -> 2/3.
    res07 = evaluate_voc(det, gt, ["cat"], use_07_metric=True)
    assert res07.ap["cat"] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_duplicate_of_best_gt_does_not_fall_back_to_second_best() -> None:
    # Devkit: the arg-max IoU GT is chosen among ALL GT; if it is already matched
    # the detection is a FP even though another unmatched GT overlaps > 0.5.
    g1, g2 = [0.0, 0.0, 10.0, 10.0], [3.0, 0.0, 13.0, 10.0]
    d2 = [1.0, 0.0, 11.0, 10.0]  # VOC IoU 9/11 with g1, 8/12 with g2
    gt = {"a": gt_entry([g1, g2], [1, 1])}
    det = {"a": det_entry([g1, d2], [0.9, 0.8], [1, 1])}
    res = evaluate_voc(det, gt, ["cat"])
    np.testing.assert_allclose(res.recall["cat"], [0.5, 0.5])
    assert res.ap["cat"] == pytest.approx(0.5)


def test_iou_threshold_is_strict_and_uses_voc_pixels() -> None:
    gt = {"a": gt_entry([A], [1])}
    # VOC pixels: GT 1..10 x 1..10 (area 100); det 1..10 x 1..5 (area 50): IoU exactly 0.5.
    det = {"a": det_entry([[0.0, 0.0, 10.0, 5.0]], [0.9], [1])}
    assert evaluate_voc(det, gt, ["cat"], iou_threshold=0.5).ap["cat"] == 0.0
    assert evaluate_voc(det, gt, ["cat"], iou_threshold=0.49).ap["cat"] == 1.0


@BOTH_METRICS
def test_difficult_only_class_is_nan_and_excluded(use_07: bool) -> None:
    gt = {"a": gt_entry([A, B], [1, 2], [False, True])}
    det = {"a": det_entry([A, B], [0.9, 0.95], [1, 2])}
    res = evaluate_voc(det, gt, ["cat", "dog"], use_07_metric=use_07)
    assert math.isnan(res.ap["dog"]) and res.num_gt["dog"] == 0 and res.num_det["dog"] == 1
    assert res.ap["cat"] == pytest.approx(1.0) and res.map == pytest.approx(1.0)


@BOTH_METRICS
def test_detections_on_difficult_objects_are_ignored(use_07: bool) -> None:
    gt = {"a": gt_entry([A, B], [1, 1], [True, False])}
    # Two hits on the difficult A (both ignored, even the repeat), then B.
    det = {"a": det_entry([A, A, B], [0.9, 0.85, 0.8], [1, 1, 1])}
    res = evaluate_voc(det, gt, ["cat"], use_07_metric=use_07)
    assert res.ap["cat"] == pytest.approx(1.0)
    assert res.num_gt["cat"] == 1 and res.num_det["cat"] == 3
    # Devkit arrays: ignored entries carry tp=fp=0 (precision 0/eps = 0 at the start).
    np.testing.assert_allclose(res.precision["cat"], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(res.recall["cat"], [0.0, 0.0, 1.0])


def test_tied_scores_keep_input_order_within_image() -> None:
    gt = {"a": gt_entry([A], [1])}
    fp_first = {"a": det_entry([FAR, A], [0.5, 0.5], [1, 1])}
    tp_first = {"a": det_entry([A, FAR], [0.5, 0.5], [1, 1])}
    # FP ranked first: rec [0, 1], prec [0, 1/2] -> AP 1/2.  TP first: AP 1.
    assert evaluate_voc(fp_first, gt, ["cat"]).ap["cat"] == pytest.approx(0.5)
    assert evaluate_voc(tp_first, gt, ["cat"]).ap["cat"] == 1.0


def test_tied_scores_across_images_follow_ground_truth_order() -> None:
    det = {"a": det_entry([FAR], [0.5], [1]), "b": det_entry([A], [0.5], [1])}
    gt_ab = {"a": gt_entry([], []), "b": gt_entry([A], [1])}
    gt_ba = {"b": gt_entry([A], [1]), "a": gt_entry([], [])}
    assert evaluate_voc(det, gt_ab, ["cat"]).ap["cat"] == pytest.approx(0.5)
    assert evaluate_voc(det, gt_ba, ["cat"]).ap["cat"] == 1.0


def test_class_without_ground_truth_is_nan_and_excluded_from_map() -> None:
    gt = {"a": gt_entry([A], [1])}
    det = {"a": det_entry([A, FAR], [0.9, 0.8], [1, 3])}
    res = evaluate_voc(det, gt, ["cat", "dog", "bird"])
    assert math.isnan(res.ap["dog"]) and res.num_det["dog"] == 0
    assert math.isnan(res.ap["bird"]) and res.num_det["bird"] == 1
    assert res.ap["cat"] == pytest.approx(1.0) and res.map == pytest.approx(1.0)
    # A class with GT but no detections scores 0 and does count.
    gt["a"] = gt_entry([A, B], [1, 2])
    res = evaluate_voc(det, gt, ["cat", "dog", "bird"])
    assert res.ap["dog"] == 0.0 and res.map == pytest.approx(0.5)


def test_image_without_detections_limits_recall() -> None:
    gt = {"a": gt_entry([A], [1]), "b": gt_entry([B], [1])}
    det = {"a": det_entry([A], [0.9], [1])}  # "b" absent: no detections
    res = evaluate_voc(det, gt, ["cat"])
    np.testing.assert_allclose(res.recall["cat"], [0.5])
    assert res.ap["cat"] == pytest.approx(0.5)
    # 11-point: t = 0..0.5 (6 points) -> precision 1, the rest 0.
    assert evaluate_voc(det, gt, ["cat"], use_07_metric=True).ap["cat"] == pytest.approx(6 / 11)


@BOTH_METRICS
def test_voc_metrics_differ_on_hand_case(use_07: bool) -> None:
    # Same ranking as test_voc_ap_hand_curve_differs_between_metrics, end to end.
    c1, c2, c3 = A, B, [60.0, 0.0, 90.0, 30.0]
    gt = {"a": gt_entry([c1, c2], [1, 1]), "b": gt_entry([c3], [1])}
    det = {
        "a": det_entry([c1, FAR, c2], [0.9, 0.8, 0.7], [1, 1, 1]),
        "b": det_entry([FAR, c3], [0.6, 0.5], [1, 1]),
    }
    expected = (4 + 3 * 2 / 3 + 4 * 3 / 5) / 11 if use_07 else (1 + 2 / 3 + 3 / 5) / 3
    assert evaluate_voc(det, gt, ["cat"], use_07_metric=use_07).ap["cat"] == pytest.approx(expected)


@BOTH_METRICS
def test_empty_inputs(use_07: bool) -> None:
    res = evaluate_voc({}, {}, ["cat"], use_07_metric=use_07)
    assert math.isnan(res.ap["cat"]) and math.isnan(res.map)
    res = evaluate_voc({}, {"a": gt_entry([A], [1])}, ["cat"], use_07_metric=use_07)
    assert res.ap["cat"] == 0.0 and res.map == 0.0 and res.num_det["cat"] == 0
    res = evaluate_voc({"a": det_entry([], [], [])}, {"a": gt_entry([], [])}, ["cat"])
    assert math.isnan(res.map)


def test_unknown_detection_image_raises() -> None:
    with pytest.raises(ValueError, match="'ghost'"):
        evaluate_voc({"ghost": det_entry([A], [0.9], [1])}, {"a": gt_entry([A], [1])}, ["cat"])
    with pytest.raises(ValueError, match="'ghost'"):
        evaluate_coco({"ghost": det_entry([A], [0.9], [1])}, {"a": gt_entry([A], [1])}, ["cat"])


def test_label_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="outside 1..1"):
        evaluate_voc({"a": det_entry([A], [0.9], [2])}, {"a": gt_entry([A], [1])}, ["cat"])
    with pytest.raises(ValueError, match="outside 1..1"):
        evaluate_voc({}, {"a": gt_entry([A], [0])}, ["cat"])


# --------------------------------------------------------------------------- #
# evaluate_voc vs the devkit port, randomised
# --------------------------------------------------------------------------- #
def _random_case(rng: np.random.Generator, n_classes: int) -> tuple[dict, dict]:
    gt, det = {}, {}
    for i in range(int(rng.integers(1, 7))):
        n = int(rng.integers(0, 6))
        xy = rng.integers(0, 200, size=(n, 2))
        wh = rng.integers(4, 80, size=(n, 2))
        labels = rng.integers(1, n_classes + 1, size=n)
        for k in range(1, n):  # crowds: same-class near-copies of the previous object
            if rng.random() < 0.3:
                xy[k], wh[k] = xy[k - 1] + rng.integers(-3, 4, size=2), wh[k - 1]
                labels[k] = labels[k - 1]
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)  # integral, like VOC
        gt[f"img{i}"] = {"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.25}

        d_boxes, d_labels = [], []
        for box, label, size in zip(boxes, labels, wh):
            for _ in range(int(rng.choice([0, 1, 1, 2]))):  # miss / hit / duplicate
                jitter = rng.normal(0.0, 0.12, size=4) * np.tile(size, 2)
                if rng.random() < 0.3:  # integral boxes: exact-threshold IoUs can occur
                    jitter = np.round(jitter)
                x1, y1, x2, y2 = box + jitter
                d_boxes.append([x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)])
                d_labels.append(label if rng.random() > 0.1 else rng.integers(1, n_classes + 1))
        for _ in range(int(rng.integers(0, 4))):  # random false detections
            x1, y1 = rng.uniform(0, 200, size=2)
            w, h = rng.uniform(4, 80, size=2)
            d_boxes.append([x1, y1, x1 + w, y1 + h])
            d_labels.append(rng.integers(1, n_classes + 1))
        m = len(d_boxes)
        scores = rng.random(m)
        scores = np.where(rng.random(m) < 0.4, np.round(scores, 1), scores)  # ties
        if m or rng.random() < 0.5:  # sometimes omit images without detections
            det[f"img{i}"] = {
                "boxes": np.asarray(d_boxes, dtype=np.float64).reshape(m, 4),
                "scores": scores,
                "labels": np.asarray(d_labels, dtype=np.int64),
            }
    return gt, det


def _to_devkit(gt: dict, det: dict, class_names: list[str]) -> tuple[dict, dict]:
    """0-based continuous -> VOC 1-based inclusive records and per-class det lines."""
    recs = {
        image_id: [
            {
                "name": class_names[int(label) - 1],
                "bbox": [float(x1) + 1.0, float(y1) + 1.0, float(x2), float(y2)],
                "difficult": int(diff),
            }
            for (x1, y1, x2, y2), label, diff in zip(g["boxes"], g["labels"], g["difficult"])
        ]
        for image_id, g in gt.items()
    }
    lines: dict[str, list] = {name: [] for name in class_names}
    for image_id in gt:  # ground-truth order, then input order: the tie contract
        d = det.get(image_id)
        if d is None:
            continue
        for (x1, y1, x2, y2), score, label in zip(d["boxes"], d["scores"], d["labels"]):
            lines[class_names[int(label) - 1]].append(
                (image_id, float(score), float(x1) + 1.0, float(y1) + 1.0, float(x2), float(y2))
            )
    return recs, lines


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_devkit_port_on_random_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    class_names = ["aeroplane", "bicycle", "bird"]
    checked = 0
    for _ in range(75):
        gt, det = _random_case(rng, len(class_names))
        recs, lines = _to_devkit(gt, det, class_names)
        for thr in (0.5, 0.7):
            for use_07 in (False, True):
                res = evaluate_voc(det, gt, class_names, iou_threshold=thr, use_07_metric=use_07)
                for name in class_names:
                    rec, prec, ap = port.voc_eval(lines[name], recs, list(gt), name, thr, use_07)
                    if math.isnan(ap):
                        assert math.isnan(res.ap[name])
                    else:
                        assert res.ap[name] == pytest.approx(ap, abs=1e-6)
                    np.testing.assert_allclose(res.precision[name], prec, atol=1e-12)
                    np.testing.assert_allclose(res.recall[name], rec, atol=1e-12)
                    checked += 1
    assert checked == 75 * 2 * 2 * len(class_names)


def test_many_detections_are_all_counted() -> None:
    # Scale, not speed: speed goals live in benchmarks/, never as timed assertions in tests.
    rng = np.random.default_rng(7)
    n_images, per_image, n_classes = 500, 40, 20
    gt, det = {}, {}
    for i in range(n_images):
        xy = rng.uniform(0, 400, size=(5, 2))
        gt[str(i)] = gt_entry(
            np.concatenate([xy, xy + 50], 1).tolist(), rng.integers(1, n_classes + 1, 5).tolist()
        )
        xy = rng.uniform(0, 400, size=(per_image, 2))
        det[str(i)] = det_entry(
            np.concatenate([xy, xy + 50], 1).tolist(),
            rng.random(per_image).tolist(),
            rng.integers(1, n_classes + 1, per_image).tolist(),
        )
    res = evaluate_voc(det, gt, [f"c{k}" for k in range(n_classes)])
    assert sum(res.num_det.values()) == n_images * per_image
    assert sum(res.num_gt.values()) == n_images * 5
    assert all(0.0 <= ap <= 1.0 for ap in res.ap.values() if not np.isnan(ap))


# --------------------------------------------------------------------------- #
# evaluate_coco
# --------------------------------------------------------------------------- #
def _direct_cocoeval(gt: dict, det: dict, class_names: list[str]) -> list[float]:
    """Independent COCOeval run: COCO GT built by hand, results through loadRes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image_id: k + 100 for k, image_id in enumerate(gt)}  # different id scheme on purpose
    anns, results = [], []
    for image_id, g in gt.items():
        for (x1, y1, x2, y2), label, diff in zip(g["boxes"], g["labels"], g["difficult"]):
            w, h = float(x2 - x1), float(y2 - y1)
            anns.append(
                {"id": len(anns) + 1, "image_id": ids[image_id], "category_id": int(label),
                 "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": int(diff)}
            )  # fmt: skip
    for image_id, d in det.items():
        for (x1, y1, x2, y2), score, label in zip(d["boxes"], d["scores"], d["labels"]):
            results.append(
                {"image_id": ids[image_id], "category_id": int(label),
                 "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                 "score": float(score)}
            )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": v} for v in ids.values()],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)],
            "annotations": anns,
        }
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [math.nan if s < 0 else float(s) for s in ev.stats[:6]]


def test_coco_perfect_detections() -> None:
    gt = {
        "a": gt_entry([[0, 0, 100, 100], [150, 150, 200, 220]], [1, 2]),
        "b": gt_entry([[10, 20, 60, 90]], [1]),
    }
    det = {
        k: det_entry(v["boxes"].tolist(), [0.9] * len(v["labels"]), v["labels"].tolist())
        for k, v in gt.items()
    }
    out = evaluate_coco(det, gt, ["cat", "dog"])
    assert set(out) == {"map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}
    assert out["map"] == pytest.approx(1.0) and out["ap50"] == pytest.approx(1.0)
    assert math.isnan(out["ap_small"])  # no small GT: COCOeval's -1 -> NaN


def test_coco_shifted_boxes_pass_ap50_fail_ap75() -> None:
    gt = {"a": gt_entry([[0, 0, 100, 100]], [1])}
    det = {"a": det_entry([[23, 0, 123, 100]], [0.9], [1])}  # IoU 77/123 ~ 0.626
    out = evaluate_coco(det, gt, ["cat"])
    assert out["ap50"] == pytest.approx(1.0)
    assert out["ap75"] == 0.0
    assert out["map"] == pytest.approx(0.3)  # matched at IoU .50, .55, .60 only


def test_coco_matches_direct_cocoeval() -> None:
    rng = np.random.default_rng(11)
    class_names = ["aeroplane", "bicycle", "bird"]
    gt, det = _random_case(rng, len(class_names))
    while sum(len(g["labels"]) for g in gt.values()) < 5:
        gt, det = _random_case(rng, len(class_names))
    out = evaluate_coco(det, gt, class_names)
    expected = _direct_cocoeval(gt, det, class_names)
    np.testing.assert_allclose(list(out.values()), expected, atol=1e-12)


def test_coco_difficult_objects_are_ignored() -> None:
    gt = {"a": gt_entry([[0, 0, 100, 100], [150, 150, 250, 250]], [1, 1], [False, True])}
    det = {"a": det_entry([[150, 150, 250, 250], [0, 0, 100, 100]], [0.95, 0.9], [1, 1])}
    out = evaluate_coco(det, gt, ["cat"])
    assert out["map"] == pytest.approx(1.0)  # the hit on the difficult box is not a FP


def test_coco_empty_inputs() -> None:
    out = evaluate_coco({}, {}, ["cat"])
    assert all(math.isnan(v) for v in out.values())
    out = evaluate_coco({}, {"a": gt_entry([[0, 0, 100, 100]], [1])}, ["cat"])
    assert out["map"] == 0.0 and out["ap50"] == 0.0


# --------------------------------------------------------------------------- #
# visualize
# --------------------------------------------------------------------------- #
def test_plot_pr_curves_writes_png(tmp_path) -> None:
    gt = {"a": gt_entry([A, B], [1, 1]), "b": gt_entry([B], [2])}
    det = {"a": det_entry([A, FAR, B], [0.9, 0.8, 0.7], [1, 1, 1]), "b": det_entry([B], [0.6], [2])}
    result = evaluate_voc(det, gt, ["cat", "dog", "bird"])  # bird: NaN, legend only
    assert isinstance(result, VocResult)
    path = tmp_path / "plots" / "pr.png"
    plot_pr_curves(result, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    with Image.open(path) as img:
        assert img.size == (800, 600)


def test_draw_detections_changes_pixels_in_box_only() -> None:
    image = Image.new("RGB", (160, 120), (128, 128, 128))
    gt = gt_entry([[10, 10, 50, 50]], [1])
    det = det_entry([[60, 40, 140, 110], [5, 5, 20, 20]], [0.9, 0.1], [2, 1])
    out = draw_detections(image, gt, det, ["cat", "dog"], score_threshold=0.3)
    assert out.size == image.size
    assert np.all(np.asarray(image) == 128)  # input untouched
    arr = np.asarray(out).astype(int)
    changed = np.any(arr != 128, axis=2)
    assert changed[40:110, 60:140].any()  # the predicted box (and its label)
    assert changed[10:50, 10:50].any()  # the GT outline
    assert not changed[0:5, 150:160].any()  # far corner untouched
    # The 0.1-score detection is below the threshold: its top edge is not drawn.
    assert not changed[5, 5:20].any()


def test_draw_detections_accepts_none_and_grayscale() -> None:
    image = Image.new("L", (64, 48), 0)
    out = draw_detections(image, None, None, ["cat"])
    assert out.mode == "RGB" and out.size == (64, 48)
    assert not np.asarray(out).any()


def test_image_grid_size() -> None:
    images = [Image.new("RGB", (300, 100), (255, 0, 0)), Image.new("L", (50, 200), 255)] + [
        Image.new("RGB", (64, 64), (0, 0, 255)) for _ in range(3)
    ]
    grid = image_grid(images, cols=2, cell=128)
    assert grid.size == (2 * 128, 3 * 128)
    arr = np.asarray(grid)
    # First tile: 300x100 -> 128x43 centred (aspect kept): padding rows stay black.
    assert not arr[0:40, 0:128].any() and arr[64, 64, 0] == 255
    assert image_grid(images[:3], cols=4, cell=32).size == (3 * 32, 32)
    with pytest.raises(ValueError):
        image_grid([])
