"""Anchors, anchor/head order, anchor targets (against the walkthrough's loop port), sampling, flips."""

from __future__ import annotations

import math
import random

import pytest
import torch

from frcnn.anchors import (
    AnchorTargetCreator,
    anchor_target_creator,
    assign_anchor_targets,
    cell_anchors,
    grid_anchors,
    hflip_anchor_index,
    hflip_anchor_targets,
    sample_anchor_labels,
)
from frcnn.boxes import BoxCoder
from frcnn.rpn import RPNHead
from tests.oracles import walkthrough_port as wp

WALK_SCALES = (8, 16, 32)
WALK_RATIOS = (0.5, 1, 2)
# In [99]: [y1, x1, y2, x2] -> [x1, y1, x2, y2]
WALK_BOXES_XYXY = [[30.0, 20.0, 500.0, 400.0], [400.0, 300.0, 600.0, 500.0]]


# ---- anchor grid ------------------------------------------------------------------------------
def test_anchor_base_matches_walkthrough_print():
    # In [95], printed in [y1, x1, y2, x2] around the centre (8, 8).
    printed_yxyx = [
        [-37.254833, -82.50967, 53.254833, 98.50967],
        [-82.50967, -173.01933, 98.50967, 189.01933],
        [-173.01933, -354.03867, 189.01933, 370.03867],
        [-56.0, -56.0, 72.0, 72.0],
        [-120.0, -120.0, 136.0, 136.0],
        [-248.0, -248.0, 264.0, 264.0],
        [-82.50967, -37.254833, 98.50967, 53.254833],
        [-173.01933, -82.50967, 189.01933, 98.50967],
        [-354.03867, -173.01933, 370.03867, 189.01933],
    ]
    expected = torch.tensor(wp.yxyx_to_xyxy(printed_yxyx), dtype=torch.float64)
    base = cell_anchors(16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0)) + 8.0
    torch.testing.assert_close(base, expected, atol=1e-2, rtol=0)
    # The port reproduces the print too (it is the oracle for the grid below).
    port = torch.tensor(wp.yxyx_to_xyxy(wp.walkthrough_anchor_base_yxyx()), dtype=torch.float64)
    torch.testing.assert_close(port, expected, atol=1e-4, rtol=0)
    # The first cell of the grid is this base.
    grid = grid_anchors(50, 50, 16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0))
    torch.testing.assert_close(grid[:9].double(), expected, atol=1e-2, rtol=0)


def test_grid_anchors_equal_walkthrough_in_y_major_order():
    grid = grid_anchors(50, 50, 16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0))
    assert grid.shape == (22500, 4) and grid.dtype == torch.float32
    walk_x_major = torch.tensor(wp.yxyx_to_xyxy(wp.walkthrough_anchors_yxyx(50, 50)), dtype=torch.float64)
    perm = torch.tensor(wp.x_major_to_y_major(50, 50, 9))
    torch.testing.assert_close(grid.double(), walk_x_major[perm], atol=1e-2, rtol=0)
    # The walkthrough's own order is not the head's order: without the permutation they differ.
    assert (grid.double() - walk_x_major).abs().max() > 100


@pytest.mark.parametrize("fh,fw,stride,scales,ratios", [
    (10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)),
    (7, 5, 8, (1.0, 3.0), (0.25, 1.0, 4.0, 2.0)),
])
def test_grid_anchors_non_square(fh, fw, stride, scales, ratios):
    grid = grid_anchors(fh, fw, stride, scales, ratios)
    a = len(scales) * len(ratios)
    walk = torch.tensor(wp.walkthrough_anchors_xyxy_ymajor(fh, fw, stride, ratios, scales), dtype=torch.float64)
    assert grid.shape == (fh * fw * a, 4)
    torch.testing.assert_close(grid.double(), walk, atol=1e-2, rtol=0)
    # Every coordinate is a multiple of 1/256 (exact in float32) and each anchor's mirror is an anchor.
    assert torch.equal(grid.double() * 256, (grid.double() * 256).round())
    w = fw * stride
    mirrored = torch.stack((w - grid[:, 2], grid[:, 1], w - grid[:, 0], grid[:, 3]), 1)
    idx = hflip_anchor_index(torch.arange(grid.shape[0]), fw, a)
    assert torch.equal(mirrored, grid[idx])


# ---- anchor order == head order ---------------------------------------------------------------
def _coord_head(num_anchors: int) -> RPNHead:
    """An RPN head whose outputs encode where they come from: input channels (y, x, 1) pass the
    3x3 conv through its centre tap; prediction for anchor a is deltas (x, y, a, 0), logits (a, y)."""
    head = RPNHead(3, 3, num_anchors)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        for c in range(3):
            head.conv.weight[c, c, 1, 1] = 1.0
        head.bbox_pred.weight.zero_()
        head.bbox_pred.bias.zero_()
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.zero_()
        for a in range(num_anchors):
            head.bbox_pred.weight[4 * a + 0, 1] = 1.0  # dx <- x
            head.bbox_pred.weight[4 * a + 1, 0] = 1.0  # dy <- y
            head.bbox_pred.bias[4 * a + 2] = float(a)  # dw <- a
            head.cls_logits.bias[2 * a + 0] = float(a)  # logit 0 <- a
            head.cls_logits.weight[2 * a + 1, 0] = 1.0  # logit 1 <- y
    return head


def test_head_prediction_i_belongs_to_anchor_i():
    fh, fw, stride = 5, 7, 16  # not square: an x-major order cannot line up by accident
    scales, ratios = (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)
    a_n = len(scales) * len(ratios)
    anchors = grid_anchors(fh, fw, stride, scales, ratios).double()
    base = cell_anchors(stride, scales, ratios)
    head = _coord_head(a_n)
    yy, xx = torch.meshgrid(torch.arange(fh, dtype=torch.float32), torch.arange(fw, dtype=torch.float32),
                            indexing="ij")
    feats = torch.stack((yy, xx, torch.ones_like(yy)))[None]
    with torch.no_grad():
        logits, deltas = head(feats)
    assert logits.shape == (1, fh * fw * a_n, 2) and deltas.shape == (1, fh * fw * a_n, 4)
    x_pred, y_pred, a_pred = deltas[0, :, 0].double(), deltas[0, :, 1].double(), deltas[0, :, 2].round().long()
    # The anchor at index i, from its geometry alone: its cell from its centre, its type from its size.
    centre_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centre_y = (anchors[:, 1] + anchors[:, 3]) / 2
    torch.testing.assert_close(centre_x, (x_pred + 0.5) * stride, atol=1e-6, rtol=0)
    torch.testing.assert_close(centre_y, (y_pred + 0.5) * stride, atol=1e-6, rtol=0)
    size = anchors[:, 2:] - anchors[:, :2]
    base_size = base[:, 2:] - base[:, :2]
    torch.testing.assert_close(size, base_size[a_pred], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[0, :, 0].round().long(), a_pred)
    torch.testing.assert_close(logits[0, :, 1].double(), y_pred)

    # The same check against the walkthrough's x-major anchors fails: that order is the bug.
    walk_x_major = torch.tensor(wp.yxyx_to_xyxy(wp.walkthrough_anchors_yxyx(fh, fw, stride, ratios, scales)),
                                dtype=torch.float64)
    assert not torch.allclose((walk_x_major[:, 0] + walk_x_major[:, 2]) / 2, (x_pred + 0.5) * stride, atol=1)


def test_single_cell_prediction_decodes_at_its_cell():
    """Only feature cell (y0, x0) is non-zero; its prediction scales every anchor there by 2 and
    scores anchor a0 highest. Decoding with the anchors: exactly the 9 anchors centred on (y0, x0)
    change, each keeps its centre and doubles, and the best-scored one is anchor a0 of that cell."""
    fh, fw, stride = 6, 9, 16
    scales, ratios = (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)
    a_n = 9
    y0, x0, a0 = 4, 1, 5
    anchors = grid_anchors(fh, fw, stride, scales, ratios)
    head = RPNHead(1, 1, a_n)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0
        head.conv.bias.zero_()
        head.bbox_pred.weight.zero_()
        head.bbox_pred.bias.zero_()
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.zero_()
        for a in range(a_n):
            head.bbox_pred.weight[4 * a + 2, 0] = math.log(2.0)
            head.bbox_pred.weight[4 * a + 3, 0] = math.log(2.0)
        head.cls_logits.weight[2 * a0 + 1, 0] = 5.0
    feats = torch.zeros(1, 1, fh, fw)
    feats[0, 0, y0, x0] = 1.0
    with torch.no_grad():
        logits, deltas = head(feats)
    boxes = BoxCoder().decode(deltas[0], anchors)
    changed = torch.nonzero((boxes - anchors).abs().amax(1) > 1e-3).flatten()
    expected = torch.arange(a_n) + (y0 * fw + x0) * a_n
    assert changed.tolist() == expected.tolist()
    cx = (boxes[changed, 0] + boxes[changed, 2]) / 2
    cy = (boxes[changed, 1] + boxes[changed, 3]) / 2
    torch.testing.assert_close(cx, torch.full_like(cx, (x0 + 0.5) * stride))
    torch.testing.assert_close(cy, torch.full_like(cy, (y0 + 0.5) * stride))
    torch.testing.assert_close(boxes[changed, 2:] - boxes[changed, :2],
                               2 * (anchors[changed, 2:] - anchors[changed, :2]), rtol=1e-5, atol=1e-4)
    best = int((logits[0, :, 1] - logits[0, :, 0]).argmax())
    assert best == (y0 * fw + x0) * a_n + a0


# ---- anchor targets against the loop port -----------------------------------------------------
def _compare_with_port(anchors: torch.Tensor, boxes: list, canvas_hw, pos_iou=0.7, neg_iou=0.3):
    port = wp.walkthrough_anchor_targets(anchors.double().tolist(), boxes, canvas_hw, pos_iou, neg_iou)
    bt = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    t = assign_anchor_targets(anchors, bt, canvas_hw, pos_iou, neg_iou)
    assert t.labels.dtype == torch.int8 and t.labels.shape == (anchors.shape[0],)
    assert t.deltas.shape == (anchors.shape[0], 4)
    exp_labels = torch.tensor(port.labels, dtype=torch.int8)
    if not torch.equal(t.labels, exp_labels):
        diff = torch.nonzero(t.labels != exp_labels).flatten()[:10]
        raise AssertionError(f"labels differ at {diff.tolist()}: frcnn {t.labels[diff].tolist()} "
                             f"port {exp_labels[diff].tolist()} (boxes {boxes})")
    inside = torch.tensor(port.inside_index, dtype=torch.long)
    if boxes:
        assert torch.equal(t.matched[inside], torch.tensor(port.matched)[inside])
    pos = torch.nonzero(exp_labels == 1).flatten()
    exp_deltas = torch.tensor(port.deltas, dtype=torch.float64)
    torch.testing.assert_close(t.deltas[pos].double(), exp_deltas[pos], atol=1e-5, rtol=1e-5)
    others = torch.ones(anchors.shape[0], dtype=torch.bool)
    others[pos] = False
    assert torch.count_nonzero(t.deltas[others]) == 0
    return port


def test_walkthrough_two_boxes_800():
    anchors = grid_anchors(50, 50, 16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0))
    port = _compare_with_port(anchors, WALK_BOXES_XYXY, (800, 800))
    assert len(port.inside_index) == 8940  # In [100]
    assert sum(label == 1 for label in port.labels) == 18  # In [109]
    torch.testing.assert_close(torch.tensor(port.gt_max_ious, dtype=torch.float64),  # In [104]
                               torch.tensor([0.68130493, 0.61035156], dtype=torch.float64), atol=1e-6, rtol=0)
    assert port.gt_best_counts == [2, 16]  # In [106]: ties included


def test_port_reproduces_walkthrough_prints_and_frcnn_positives_are_its_anchors():
    """The port on the walkthrough's own (x-major, unrounded) anchors reproduces its prints; the
    printed positive positions, mapped to the y-major order, are exactly frcnn's positives."""
    walk = wp.yxyx_to_xyxy(wp.walkthrough_anchors_yxyx(50, 50))
    port = wp.walkthrough_anchor_targets(walk, WALK_BOXES_XYXY, (800, 800))
    assert len(port.inside_index) == 8940
    printed_pos = [2262, 2508, 5620, 5628, 5636, 5644, 5866, 5874, 5882, 5890, 6112,
                   6120, 6128, 6136, 6358, 6366, 6374, 6382]  # In [109]: positions in inside_index
    pos_positions = [n for n, k in enumerate(port.inside_index) if port.labels[k] == 1]
    assert pos_positions == printed_pos
    # In [113]: first and last rows of anchor_locs, (dy, dx, dh, dw) -> (dx, dy, dw, dh)
    first = port.deltas[port.inside_index[0]]
    last = port.deltas[port.inside_index[-1]]
    torch.testing.assert_close(torch.tensor(first, dtype=torch.float64),
                               torch.tensor([2.30914558, 0.5855728, 1.64727602, 0.7415674], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(last, dtype=torch.float64),
                               torch.tensor([-5.29225232, -2.68479606, 1.64727602, 0.7415674], dtype=torch.float64),
                               atol=1e-6, rtol=0)

    perm = wp.x_major_to_y_major(50, 50, 9)
    y_of_x = {xm: ym for ym, xm in enumerate(perm)}
    expected = sorted(y_of_x[port.inside_index[p]] for p in printed_pos)
    t = assign_anchor_targets(grid_anchors(50, 50, 16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0)),
                              torch.tensor(WALK_BOXES_XYXY), (800, 800))
    assert t.pos_index.tolist() == expected


def _random_boxes(rng: random.Random, kind: str, height: int, width: int, n: int) -> list:
    boxes = []
    for _ in range(n):
        if kind == "int":
            x1, y1 = rng.randint(0, width - 2), rng.randint(0, height - 2)
            x2, y2 = rng.randint(x1 + 1, width), rng.randint(y1 + 1, height)
        elif kind == "grid":  # on the 8/16-px grid, larger than the small anchors: exact ties
            q = rng.choice((8, 16))
            x1, y1 = q * rng.randint(0, width // q - 2), q * rng.randint(0, height // q - 2)
            x2 = min(width, x1 + q * rng.randint(2, 8))
            y2 = min(height, y1 + q * rng.randint(2, 8))
        elif kind == "dyadic":
            x1, y1 = rng.randint(0, 4 * (width - 8)) / 4, rng.randint(0, 4 * (height - 8)) / 4
            x2 = min(float(width), x1 + rng.randint(4, 4 * 120) / 4)
            y2 = min(float(height), y1 + rng.randint(4, 4 * 120) / 4)
        elif kind == "corner":  # tiny, only border-crossing anchors reach it
            x1, y1 = rng.choice(((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1)))
            x2, y2 = x1 + 1, y1 + 1
        else:
            raise ValueError(kind)
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
    return boxes


CONFIGS = [
    # feat_h, feat_w, stride, scales, ratios, pos_iou, neg_iou
    (10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0), 0.7, 0.3),
    (8, 8, 16, (1.0, 2.0, 4.0), (0.5, 1.0, 2.0), 0.7, 0.3),
    (12, 9, 8, (4.0, 8.0), (0.5, 1.0, 2.0), 0.6, 0.4),
]


def _oracle_box_sets(rng: random.Random, h: int, w: int, n_sets: int = 100):
    """Random box sets with exact ties (grid-aligned boxes), boxes no inside anchor touches, and
    empty images."""
    kinds = ("int", "grid", "dyadic", "grid")
    for k in range(n_sets):
        if k % 25 == 0:
            boxes = []
        else:
            boxes = []
            for _ in range(rng.randint(1, 3)):
                boxes += _random_boxes(rng, rng.choice(kinds), h, w, rng.randint(1, 2))
            if k % 5 == 0:  # a box no inside anchor touches, among others
                boxes.insert(rng.randint(0, len(boxes)), _random_boxes(rng, "corner", h, w, 1)[0])
        if k % 25 == 1:
            boxes = _random_boxes(rng, "corner", h, w, 1)  # only a zero-IoU box
        yield boxes


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "not-a-grid"])
@pytest.mark.parametrize("cfg_i", range(len(CONFIGS)))
def test_assign_anchor_targets_equals_loop_port(cfg_i, grid):
    """300 random sets per path against the loop port: on a grid the creator computes IoU only
    where it can matter (pruned); with anchors that are not a grid (7 % dropped at random) it
    computes the full IoU matrix. Both must give the port's labels, matches and deltas."""
    fh, fw, stride, scales, ratios, pos_iou, neg_iou = CONFIGS[cfg_i]
    h, w = fh * stride, fw * stride
    anchors = grid_anchors(fh, fw, stride, scales, ratios)
    if not grid:
        keep = torch.rand(anchors.shape[0], generator=torch.Generator().manual_seed(cfg_i)) > 0.07
        anchors = anchors[keep]
    assert anchor_target_creator(anchors, (h, w), pos_iou, neg_iou).pruned is grid
    rng = random.Random(1234 + cfg_i)
    tie_cases = zero_cases = empty_cases = 0
    for boxes in _oracle_box_sets(rng, h, w):
        port = _compare_with_port(anchors, boxes, (h, w), pos_iou, neg_iou)
        if not boxes:
            empty_cases += 1
            assert all(port.labels[i] == 0 for i in port.inside_index)
            continue
        for best, count in zip(port.gt_max_ious, port.gt_best_counts):
            if best == 0:
                zero_cases += 1
            elif count > 1 and best < pos_iou:
                tie_cases += 1  # several anchors positive only through the tie rule
    # The cases that matter actually happened.
    assert empty_cases >= 4
    if cfg_i != 1:  # config 1 has 16-px anchors flush with the corners: no zero-IoU corner box
        assert zero_cases >= 10
    assert tie_cases >= (20 if grid else 10)


def test_zero_iou_box_makes_no_anchor_positive():
    fh, fw, stride = 10, 14, 16
    anchors = grid_anchors(fh, fw, stride, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0))
    h, w = fh * stride, fw * stride
    corner = [[0.0, 0.0, 1.0, 1.0]]
    port = _compare_with_port(anchors, corner, (h, w))
    assert port.gt_max_ious == [0.0]
    t = assign_anchor_targets(anchors, torch.tensor(corner), (h, w))
    inside = torch.tensor(port.inside_index)
    assert (t.labels == 1).sum() == 0
    assert bool((t.labels[inside] == 0).all())
    # With a real box too: the positives are exactly those of the real box alone.
    real = [[40.0, 40.0, 120.0, 100.0]]
    both = assign_anchor_targets(anchors, torch.tensor(corner + real), (h, w))
    alone = assign_anchor_targets(anchors, torch.tensor(real), (h, w))
    assert torch.equal(both.labels, alone.labels)


def test_no_boxes_all_inside_negative():
    anchors = grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0))
    t = assign_anchor_targets(anchors, torch.zeros((0, 4)), (160, 224))
    a = anchors
    inside = (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] <= 224) & (a[:, 3] <= 160)
    assert inside.any() and (~inside).any()
    assert bool((t.labels[inside] == 0).all()) and bool((t.labels[~inside] == -1).all())
    assert torch.count_nonzero(t.deltas) == 0


# ---- AnchorTargetCreator: per-grid cache, sparse positives, the walkthrough's canvas ----------
def _same_targets(a, b) -> None:
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.pos_index, b.pos_index)
    assert torch.equal(a.pos_deltas, b.pos_deltas)
    assert torch.equal(a.matched, b.matched)


def test_creator_cache_across_grids_and_canvases_equals_fresh_creators():
    """Alternating grids, canvases, thresholds and box coders through the cached
    ``assign_anchor_targets`` gives what a fresh creator gives each time (and the port's labels);
    an equal copy of a grid reuses its creator; a grid changed in place does not."""
    cases = [
        (grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)), (160, 224), 0.7, 0.3, None),
        (grid_anchors(12, 9, 8, (4.0, 8.0), (0.5, 1.0, 2.0)), (96, 72), 0.6, 0.4, None),
        (grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)), (150, 200), 0.7, 0.3, None),  # smaller canvas
        (grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0)), (160, 224), 0.5, 0.2, BoxCoder((10, 10, 5, 5))),
    ]
    rng = random.Random(99)
    for k in range(40):
        anchors, hw, pos_iou, neg_iou, coder = cases[k % len(cases)]
        boxes = _random_boxes(rng, rng.choice(("int", "grid", "dyadic")), hw[0], hw[1], rng.randint(1, 5))
        bt = torch.tensor(boxes)
        got = assign_anchor_targets(anchors, bt, hw, pos_iou, neg_iou, coder)
        _same_targets(got, AnchorTargetCreator(anchors, hw, pos_iou, neg_iou, coder)(bt))
        port = wp.walkthrough_anchor_targets(anchors.double().tolist(), boxes, hw, pos_iou, neg_iou)
        assert got.labels.tolist() == port.labels
    anchors, hw = cases[0][0], cases[0][1]
    first = anchor_target_creator(anchors, hw)
    assert anchor_target_creator(anchors, hw) is first
    assert anchor_target_creator(anchors.clone(), hw) is first  # an equal grid, another tensor
    assert anchor_target_creator(anchors, hw, 0.6) is not first
    # In place: the same tensor object now holds another grid; the cache must not serve the old one.
    shifted = anchors.clone()
    anchor_target_creator(shifted, hw)
    shifted[:, 0::2] += 16.0
    bt = torch.tensor([[20.0, 30.0, 120.0, 110.0], [100.0, 20.0, 210.0, 150.0]])
    _same_targets(assign_anchor_targets(shifted, bt, hw), AnchorTargetCreator(shifted.clone(), hw)(bt))


def test_creator_walkthrough_canvas_equals_port_with_many_boxes():
    """The benchmark's case: 800x800, 22,500 anchors, 2 and 20 random boxes (and 20 on the
    16-px grid: exact ties), against the loop port."""
    anchors = grid_anchors(50, 50, 16, (8.0, 16.0, 32.0), (0.5, 1.0, 2.0))
    rng = random.Random(5)
    sets = [_random_boxes(rng, "int", 800, 800, 2), _random_boxes(rng, "int", 800, 800, 20),
            _random_boxes(rng, "grid", 800, 800, 20)]
    for boxes in sets:
        _compare_with_port(anchors, boxes, (800, 800))


def test_iou_exactly_at_the_thresholds_equals_port():
    """Boxes whose IoU with some anchors is exactly the threshold (0.75 / 0.25: exact in binary)
    or one rounding from it (0.7 / 0.3): the pruned path's bounds must keep every such pair, and
    label it as the port does (>= pos_iou positive, < neg_iou negative)."""
    anchors = grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0))
    boxes = []
    for t in (0.25, 0.75, 0.3, 0.7, 0.5):
        for x0 in (56.0, 104.0):  # 32x32 anchors [56, 88] and [104, 136] in x; same in y
            boxes.append([x0, 56.0, x0 + 32.0 * t, 88.0])  # inside the anchor: IoU = t (as rounded)
            boxes.append([x0, 56.0, x0 + 32.0 / t, 88.0])  # containing it: IoU = t
        boxes.append([40.0, 40.0, 40.0 + 64.0 * t, 104.0])  # inside a 64x64 anchor
    hits = set()
    for k in range(0, len(boxes), 3):
        for pos_iou, neg_iou in ((0.75, 0.25), (0.7, 0.3)):
            _compare_with_port(anchors, boxes[k:k + 3], (160, 224), pos_iou, neg_iou)
        hits |= {wp._iou_loop(a, b) for a in anchors.double().tolist() for b in boxes[k:k + 3]}
    assert {0.25, 0.75} <= hits  # the exact cases did occur
    _compare_with_port(anchors, boxes, (160, 224), 0.75, 0.25)


def test_sparse_positives_and_lazy_dense_fields():
    """pos_index/pos_deltas are the positives of the dense fields; the deltas are BoxCoder's
    encoding of each positive's matched box (to float32 rounding of log)."""
    anchors = grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[10.0, 12.0, 90.0, 70.0], [100.0, 40.0, 200.0, 150.0], [30.5, 80.25, 60.0, 120.0]])
    t = assign_anchor_targets(anchors, boxes, (160, 224), box_coder=coder)
    assert t.pos_index.dtype == torch.int64 and t.pos_deltas.dtype == torch.float32
    assert torch.equal(t.pos_index, torch.nonzero(t.labels == 1).flatten())
    assert t.pos_index.numel() >= 3
    dense = t.deltas
    assert dense.shape == (anchors.shape[0], 4)
    assert torch.equal(dense[t.pos_index], t.pos_deltas)
    assert torch.count_nonzero(dense.abs().sum(1)) <= t.pos_index.numel()
    expected = coder.encode(boxes[t.matched[t.pos_index]], anchors[t.pos_index])
    torch.testing.assert_close(t.pos_deltas, expected, atol=2e-6, rtol=1e-6)


def test_creator_threads_share_one_creator():
    """A creator shared by threads (its work buffers are per thread) gives every thread the
    sequential results, on the dense path too (anchors that are not a grid)."""
    from concurrent.futures import ThreadPoolExecutor

    anchors = grid_anchors(10, 14, 16, (2.0, 4.0, 8.0), (0.5, 1.0, 2.0))
    anchors = anchors[torch.rand(anchors.shape[0], generator=torch.Generator().manual_seed(0)) > 0.2]
    creator = AnchorTargetCreator(anchors, (160, 224))
    assert not creator.pruned
    rng = random.Random(3)
    sets = [torch.tensor(_random_boxes(rng, "int", 160, 224, rng.randint(1, 12))) for _ in range(24)]
    expected = [creator(b) for b in sets]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: creator(b), sets * 3))
    for k, t in enumerate(got):
        _same_targets(t, expected[k % len(sets)])


# ---- sampling ---------------------------------------------------------------------------------
def _labels_row(n, n_pos, n_neg, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    row = torch.full((n,), -1, dtype=torch.int8)
    row[perm[:n_pos]] = 1
    row[perm[n_pos:n_pos + n_neg]] = 0
    return row


@pytest.mark.parametrize("n_pos,n_neg,exp_pos,exp_neg", [
    (300, 5000, 128, 128),  # too many positives: capped at half
    (10, 5000, 10, 246),    # few positives: negatives fill up to 256
    (20, 30, 20, 30),       # not enough of either: take all
    (0, 1000, 0, 256),
    (0, 0, 0, 0),
])
def test_sample_anchor_labels_counts(n_pos, n_neg, exp_pos, exp_neg):
    labels = torch.stack([_labels_row(6000, n_pos, n_neg, s) for s in range(3)])
    out = sample_anchor_labels(labels, 256, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == labels.shape
    for r in range(3):
        assert int((out[r] == 1).sum()) == exp_pos
        assert int((out[r] == 0).sum()) == exp_neg
        assert int((out[r] >= 0).sum()) <= 256
    # Only from the right labels.
    assert bool((labels[out == 1] == 1).all())
    assert bool((labels[out == 0] == 0).all())
    assert set(out.unique().tolist()) <= {-1, 0, 1}


def test_sample_anchor_labels_draws_differ_and_are_reproducible():
    labels = _labels_row(6000, 400, 5000, 7)[None].repeat(2, 1)
    a = sample_anchor_labels(labels, 256, 0.5, torch.Generator().manual_seed(1))
    b = sample_anchor_labels(labels, 256, 0.5, torch.Generator().manual_seed(2))
    c = sample_anchor_labels(labels, 256, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, c)
    assert not torch.equal(a[0], b[0])
    assert not torch.equal(a[0], a[1])  # rows are drawn independently
    # Over many draws every positive gets its chance (the sample is not a fixed prefix).
    seen = torch.zeros(6000, dtype=torch.bool)
    for s in range(20):
        seen |= sample_anchor_labels(labels[:1], 256, 0.5, torch.Generator().manual_seed(100 + s))[0] == 1
    assert int(seen.sum()) > 350


# ---- horizontal flip --------------------------------------------------------------------------
@pytest.mark.parametrize("fh,fw,stride,scales", [
    (10, 14, 16, (2.0, 4.0, 8.0)),
    (50, 50, 16, (8.0, 16.0, 32.0)),
    (9, 13, 8, (2.0, 5.0)),
])
def test_hflip_targets_equal_targets_of_flipped_boxes(fh, fw, stride, scales):
    ratios = (0.5, 1.0, 2.0)
    a_n = len(scales) * len(ratios)
    anchors = grid_anchors(fh, fw, stride, scales, ratios)
    h, w = fh * stride, fw * stride
    rng = random.Random(fh * 1000 + fw)
    n_sets = 60 if fh < 50 else 15
    batch_labels, batch_deltas, flipped_sets = [], [], []
    for _ in range(n_sets):
        boxes = []
        for _ in range(rng.randint(0, 4)):
            boxes += _random_boxes(rng, rng.choice(("int", "grid", "dyadic", "corner")), h, w, 1)
        bt = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        t = assign_anchor_targets(anchors, bt, (h, w))
        fl_boxes = torch.stack((w - bt[:, 2], bt[:, 1], w - bt[:, 0], bt[:, 3]), 1)
        t_flip = assign_anchor_targets(anchors, fl_boxes, (h, w))
        labels, deltas = hflip_anchor_targets(t.labels, t.deltas, (fh, fw), a_n)
        assert labels.dtype == t.labels.dtype
        assert torch.equal(labels, t_flip.labels), f"labels differ for boxes {boxes}"
        torch.testing.assert_close(deltas, t_flip.deltas, atol=1e-5, rtol=1e-5)
        batch_labels.append(t.labels)
        batch_deltas.append(t.deltas)
        flipped_sets.append(t_flip)
    # Batched (B, N) input flips each row the same way.
    labels, deltas = hflip_anchor_targets(torch.stack(batch_labels), torch.stack(batch_deltas), (fh, fw), a_n)
    assert torch.equal(labels, torch.stack([t.labels for t in flipped_sets]))
    torch.testing.assert_close(deltas, torch.stack([t.deltas for t in flipped_sets]), atol=1e-5, rtol=1e-5)


def test_hflip_anchor_index_agrees_with_dense_flip():
    fh, fw, a_n = 7, 11, 9
    n = fh * fw * a_n
    labels = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    deltas = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    fl_labels, fl_deltas = hflip_anchor_targets(labels, deltas, (fh, fw), a_n)
    idx = torch.arange(n)
    j = hflip_anchor_index(idx, fw, a_n)
    assert sorted(j.tolist()) == idx.tolist()  # a permutation
    assert torch.equal(hflip_anchor_index(j, fw, a_n), idx)  # an involution
    assert torch.equal(fl_labels[j], labels)
    torch.testing.assert_close(fl_deltas[j], deltas * torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    # Spot check by hand: cell (y, x) anchor a -> cell (y, fw - 1 - x) anchor a.
    y, x, a = 3, 2, 4
    assert int(hflip_anchor_index(torch.tensor([(y * fw + x) * a_n + a]), fw, a_n)) == (y * fw + fw - 1 - x) * a_n + a
