"""Anchor coverage against independent oracles: IoUs worked out by hand on a tiny grid, and a
plain loop over every anchor for random boxes; the warning names the scale or ratio that the
missed boxes need."""

from __future__ import annotations

import numpy as np
import pytest

from frcnn.anchor_coverage import CoverageMeter, CoverageStats, plot_coverage, size_buckets, suggest, warning_line
from frcnn.anchors import grid_anchors
from tests.oracles.anchor_coverage_loop import best_iou_loop


def test_best_iou_by_hand_on_a_tiny_grid():
    # 16 x 16 anchors centred every 8 px on a 64 x 64 canvas: (4, 4, 20, 20), (12, 4, 28, 20)...
    meter = CoverageMeter(grid_anchors(8, 8, 8, (2.0,), (1.0,)), (64, 64))
    boxes = np.array([[4, 4, 20, 20],     # an anchor exactly: 1
                      [6, 4, 22, 20],     # 2 px off: 14*16 / (2*256 - 224) = 7/9
                      [8, 8, 24, 24],     # half a cell off both ways: 12*12 / (512 - 144) = 9/23
                      [10, 10, 14, 14],   # 4 x 4 inside an anchor: 16 / 256
                      [4, 4, 44, 44]])    # 40 x 40 around anchors: 256 / 1600
    np.testing.assert_allclose(meter.best_iou(boxes), [1.0, 7 / 9, 9 / 23, 1 / 16, 0.16], rtol=0, atol=1e-12)
    stats = CoverageStats.empty(min_iou=0.3, pos_iou=0.7)
    stats.add(meter.best_iou(boxes), np.full(5, 100.0), boxes)  # all "small"
    assert stats.boxes.tolist() == [5, 0, 0] and stats.covered.tolist() == [3, 0, 0]
    assert stats.coverage() == pytest.approx(0.6) and stats.coverage(1) is None
    assert stats.metrics()["anchor_share_at_pos_iou"] == pytest.approx(0.4)


def test_best_iou_and_shares_equal_a_plain_loop():
    rng = np.random.default_rng(0)
    h, w, stride = 96, 128, 8
    anchors = grid_anchors(h // stride, w // stride, stride, (1.0, 2.0, 4.0), (0.5, 1.0, 2.0))
    xy = rng.uniform(0, [w - 4, h - 4], size=(60, 2))
    wh = rng.uniform(3, 70, size=(60, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    want = np.array(best_iou_loop(anchors.double().numpy(), boxes, h, w))
    got = CoverageMeter(anchors, (h, w)).best_iou(boxes)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)

    scale = 0.5  # canvas = original * 0.5: original areas are 4x the canvas's
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / scale**2
    stats = CoverageStats.empty(min_iou=0.3, pos_iou=0.7)
    stats.add(got[:25], areas[:25], boxes[:25])
    rest = CoverageStats.empty(min_iou=0.3, pos_iou=0.7)
    rest.add(got[25:], areas[25:], boxes[25:])
    stats.merge(CoverageStats.from_dict(rest.to_dict()))  # as the ledger merges workers' counts
    for k in range(3):
        in_k = [i for i in range(60) if int(areas[i] >= 32**2) + int(areas[i] >= 96**2) == k]
        assert stats.boxes[k] == len(in_k) > 0
        assert stats.covered[k] == sum(want[i] >= 0.3 for i in in_k)
        assert stats.iou_sum[k] == pytest.approx(sum(want[i] for i in in_k))
    assert stats.hist.sum() == 60
    m = stats.metrics()
    assert m["anchor_boxes"] == 60 and m["anchor_coverage"] == pytest.approx(np.mean(want >= 0.3))
    assert m["anchor_share_at_pos_iou"] == pytest.approx(np.mean(want >= 0.7))
    assert m["anchor_best_iou_p50"] == pytest.approx(np.ceil(np.quantile(want, 0.5, method="inverted_cdf") * 100) / 100)
    assert size_buckets(np.array([32**2 - 1, 32**2, 96**2 - 1, 96**2])).tolist() == [0, 1, 1, 2]


def _stats_for(boxes: np.ndarray, anchors, hw) -> CoverageStats:
    stats = CoverageStats.empty(min_iou=0.3, pos_iou=0.7)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    stats.add(CoverageMeter(anchors, hw).best_iou(boxes), areas, boxes)
    return stats


SCALES, RATIOS, STRIDE = (2.0, 4.0, 8.0), (0.5, 1.0, 2.0), 16  # 32, 64, 128 px anchors


def test_tiny_boxes_ask_for_a_smaller_scale():
    xy = np.array([[10, 10], [40, 70], [100, 20], [64, 64], [3, 90], [75, 33]], dtype=np.float64)
    boxes = np.concatenate([xy, xy + 8], 1)  # 8 x 8 on a 128 x 128 canvas
    stats = _stats_for(boxes, grid_anchors(8, 8, STRIDE, SCALES, RATIOS), (128, 128))
    assert stats.coverage() == 0.0
    assert suggest(stats, STRIDE, SCALES, RATIOS).scales == ((0.5, 6),)
    assert warning_line(stats, STRIDE, SCALES, RATIOS) == (
        "anchor coverage 0% of 6 boxes have an anchor at IoU >= 0.3 (small 0% of 6), under 90%: "
        "add anchor scale 0.5 (6 boxes)")


def test_elongated_boxes_ask_for_another_ratio():
    # 26 x 157: about 6:1 (height / width), the area of a 64 px anchor (scale 4); square anchors only
    x = np.array([8, 50, 100, 150, 200], dtype=np.float64)
    boxes = np.stack([x, x * 0 + 40, x + 26, x * 0 + 197], 1)
    square = (1.0,)
    stats = _stats_for(boxes, grid_anchors(16, 16, STRIDE, SCALES, square), (256, 256))
    assert stats.coverage() == 0.0
    s = suggest(stats, STRIDE, SCALES, square)
    assert s.ratios == ((6.0, 5),) and s.scales == () and s.left == 0
    line = warning_line(stats, STRIDE, SCALES, square)
    assert line.endswith(": add anchor ratio 6 (5 boxes)") and "\n" not in line
    wide = boxes[:, [1, 0, 3, 2]]  # the same boxes lying down: 1:6
    assert suggest(_stats_for(wide, grid_anchors(16, 16, STRIDE, SCALES, square), (256, 256)),
                   STRIDE, SCALES, square).ratios == ((0.17, 5),)


def test_well_covered_data_gives_no_warning_and_misplaced_boxes_are_told_apart():
    anchors = grid_anchors(8, 8, STRIDE, SCALES, RATIOS)
    on_grid = np.array([[8, 8, 40, 40], [24, 56, 88, 120], [40, 40, 72, 72]], dtype=np.float64)  # anchors
    assert warning_line(_stats_for(on_grid, anchors, (128, 128)), STRIDE, SCALES, RATIOS) is None
    # 16 x 16 boxes half a cell off both ways, with 16 px anchors: the shape is an anchor's, the
    # position is not (IoU 64 / 448 with the nearest, 256 / 1024 inside a 32 px one).
    off = np.array([[8, 8, 24, 24], [40, 8, 56, 24], [8, 40, 24, 56]], dtype=np.float64)
    small = (1.0, 2.0, 4.0)
    stats = _stats_for(off, grid_anchors(8, 8, STRIDE, small, RATIOS), (128, 128))
    assert stats.coverage() == 0.0
    s = suggest(stats, STRIDE, small, RATIOS)
    assert (s.scales, s.ratios, s.between) == ((), (), 3)
    assert warning_line(stats, STRIDE, small, RATIOS).endswith(
        "no added scale or ratio matches them; 3 boxes fall between anchor centres (stride 16)")


def test_plot_is_a_png(tmp_path):
    boxes = np.array([[4, 4, 20, 20], [8, 8, 24, 24]], dtype=np.float64)
    stats = _stats_for(boxes, grid_anchors(8, 8, 8, (2.0,), (1.0,)), (64, 64))
    plot_coverage(stats, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
