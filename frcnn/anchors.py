"""Anchors and the RPN's training targets (Ren et al. 2015, section 3.1.2).

Anchor order, everywhere in this package: index ``(y * W + x) * A + a`` for feature cell (y, x)
and anchor ``a = ratio_index * len(scales) + scale_index``. It is the order of the RPN head's
outputs after ``permute(0, 2, 3, 1)`` (the walkthrough enumerated x-major and so paired each
prediction with the wrong anchor).

Targets are computed once per image (by the precompute pipeline or by the model itself) and
*before* sampling: ``sample_anchor_labels`` draws a fresh 256-anchor sample at every step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .boxes import BoxCoder

# Anchor half-sizes are rounded to 1/256 px so that every anchor coordinate is exact in float32
# and the mirror image of an anchor is exactly another anchor: a flipped canvas then gets
# bit-identical IoUs, and so identical labels, ties included. The change is < 0.002 px.
_ANCHOR_QUANTUM = 256.0


def cell_anchors(stride: int, scales: tuple[float, ...], ratios: tuple[float, ...]) -> Tensor:
    """The A anchors of one cell centred at the origin, ``(A, 4)`` float64.

    h = stride * scale * sqrt(ratio), w = stride * scale / sqrt(ratio): ratio is height/width and
    the area is (stride * scale)^2, as in the walkthrough.
    """
    out = []
    for r in ratios:
        for s in scales:
            h = stride * s * r**0.5
            w = stride * s * (1.0 / r) ** 0.5
            hh = round(h / 2 * _ANCHOR_QUANTUM) / _ANCHOR_QUANTUM
            hw = round(w / 2 * _ANCHOR_QUANTUM) / _ANCHOR_QUANTUM
            out.append((-hw, -hh, hw, hh))
    return torch.tensor(out, dtype=torch.float64)


def grid_anchors(feat_h: int, feat_w: int, stride: int, scales: tuple[float, ...],
                 ratios: tuple[float, ...]) -> Tensor:
    """All anchors of a ``feat_h x feat_w`` map, ``(feat_h * feat_w * A, 4)`` float32, centred on
    each cell at ``((x + 0.5) * stride, (y + 0.5) * stride)``."""
    base = cell_anchors(stride, scales, ratios)  # (A, 4)
    cy = (torch.arange(feat_h, dtype=torch.float64) + 0.5) * stride
    cx = (torch.arange(feat_w, dtype=torch.float64) + 0.5) * stride
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")  # (H, W): y-major, as the head's outputs
    centres = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (centres + base[None]).reshape(-1, 4).float()  # (H*W, A, 4) -> (H*W*A, 4)


class AnchorTargets:
    """Per-anchor targets of one image, before sampling.

    labels:     int8 ``(N,)``: 1 positive, 0 negative, -1 ignored.
    pos_index:  int64 ``(P,)``: the positive anchors, ascending (``nonzero(labels == 1)``).
    pos_deltas: float32 ``(P, 4)``: their encoded regression targets (what precompute stores).
    deltas:     float32 ``(N, 4)``: the same, dense (zero except at positives); built on first use.
    matched:    int64 ``(N,)``: index of the box each inside anchor overlaps most, first on ties
                (-1 outside, and everywhere with no boxes); computed on first use -- no training
                path needs it, and it costs a full argmax over every anchor and box.
    """

    __slots__ = ("labels", "pos_index", "pos_deltas", "_deltas", "_matched", "_matched_fn")

    def __init__(self, labels: Tensor, pos_index: Tensor, pos_deltas: Tensor,
                 matched: Tensor | Callable[[], Tensor]) -> None:
        self.labels = labels
        self.pos_index = pos_index
        self.pos_deltas = pos_deltas
        self._deltas: Tensor | None = None
        self._matched = matched if isinstance(matched, Tensor) else None
        self._matched_fn = None if isinstance(matched, Tensor) else matched

    @property
    def deltas(self) -> Tensor:
        if self._deltas is None:
            d = torch.zeros((self.labels.shape[0], 4), dtype=torch.float32, device=self.labels.device)
            d[self.pos_index] = self.pos_deltas
            self._deltas = d
        return self._deltas

    @property
    def matched(self) -> Tensor:
        if self._matched is None:
            self._matched = self._matched_fn()
            self._matched_fn = None
        return self._matched


def _encode_np(boxes: np.ndarray, ref: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``BoxCoder.encode`` in float32 numpy: the same operations on the same operands, so the
    same deltas up to the last bit of ``log`` (a torch call per op costs more than the arithmetic
    on a few dozen positives)."""
    half = np.float32(0.5)
    r_wh = ref[:, 2:] - ref[:, :2]
    r_c = ref[:, :2] + half * r_wh
    b_wh = boxes[:, 2:] - boxes[:, :2]
    b_c = boxes[:, :2] + half * b_wh
    out = np.empty((ref.shape[0], 4), dtype=np.float32)
    out[:, :2] = weights[:2] * (b_c - r_c) / r_wh
    out[:, 2:] = weights[2:] * np.log(b_wh / r_wh)
    return out


class _Group:
    """Inside anchors of one shape (exact width and height): ``ny`` distinct y-extents x ``nx``
    distinct x-extents. On a grid every pair occurs once (``product``), and the group's
    intersections with a box are the outer product of its heights and widths of overlap."""

    __slots__ = ("offset", "size", "ny", "nx", "ys", "xs", "area", "product", "yinv", "xinv")


def _cat(parts: list, n: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, n))


def _cat_index(parts: list) -> np.ndarray:
    return np.concatenate(parts).astype(np.intp) if parts else np.zeros(0, np.intp)


def _shape_groups(ai: np.ndarray) -> tuple[list[_Group], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The inside anchors ``ai`` (float64, canvas order) by shape: the groups, each group's members
    (indices into ``ai``, in the group's column order) and its distinct y- and x-extents."""
    shapes, shape_of = np.unique(np.stack((ai[:, 2] - ai[:, 0], ai[:, 3] - ai[:, 1]), 1), axis=0,
                                 return_inverse=True)
    shape_of = shape_of.reshape(-1)
    groups, order, ys_all, xs_all = [], [], [], []
    offset = 0
    for g in range(shapes.shape[0]):
        members = np.flatnonzero(shape_of == g)
        ys, yinv = np.unique(ai[members][:, [1, 3]], axis=0, return_inverse=True)
        xs, xinv = np.unique(ai[members][:, [0, 2]], axis=0, return_inverse=True)
        yinv, xinv = yinv.reshape(-1), xinv.reshape(-1)
        cell = yinv * len(xs) + xinv
        grp = _Group()
        grp.product = members.size == len(ys) * len(xs) and np.unique(cell).size == members.size
        if grp.product:
            members = members[np.argsort(cell, kind="stable")]  # y-extent-major, as the outer product
        else:  # not a grid: gather per anchor (correct for any anchors, slower)
            grp.yinv, grp.xinv = yinv.astype(np.intp), xinv.astype(np.intp)
        grp.offset, grp.size, grp.ny, grp.nx = offset, members.size, len(ys), len(xs)
        y0, x0 = sum(len(y) for y in ys_all), sum(len(x) for x in xs_all)
        grp.ys, grp.xs = slice(y0, y0 + len(ys)), slice(x0, x0 + len(xs))
        # area as box_iou computes it: (x2 - x1) * (y2 - y1), identical for every member
        grp.area = float(shapes[g, 0] * shapes[g, 1])
        ys_all.append(ys)
        xs_all.append(xs)
        groups.append(grp)
        order.append(members)
        offset += members.size
    return groups, order, ys_all, xs_all


class AnchorTargetCreator:
    """The RPN's anchor targets (Ren et al. 2015, 3.1.2) for one anchor grid and canvas.

    Built once per grid, called once per image with its ground-truth boxes; gives exactly what
    the walkthrough's rules give (see ``assign_anchor_targets``), IoU in float64, in a fraction of
    the time: everything that depends only on the grid -- which anchors are inside the canvas,
    their shapes, extents and areas -- is computed here, once. Per image, the overlap width of a
    box with each distinct anchor x-extent (and height with each y-extent) is a small table; the
    intersections of a shape's anchors with the box are then one outer product, and the IoU is
    computed into work buffers kept between calls (fresh multi-MB temporaries page-fault on
    every call). The values are bit-identical to ``torchvision.ops.box_iou`` in float64: the same
    operations on the same operands. Positives come back sparse (index, deltas); dense deltas and
    the matched box of every anchor are computed only when asked for.

    One instance may be shared by threads: the work buffers are per thread.
    """

    def __init__(self, anchors: Tensor, canvas_hw: tuple[int, int], pos_iou: float = 0.7,
                 neg_iou: float = 0.3, box_coder: BoxCoder | None = None) -> None:
        self.source = anchors  # kept: the per-grid cache compares against it
        self.source_version = anchors._version
        self.device = anchors.device
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self.pos_iou, self.neg_iou = float(pos_iou), float(neg_iou)
        self.coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.num_anchors = int(anchors.shape[0])
        a32 = anchors.detach().to("cpu", torch.float32).numpy()
        a64 = anchors.detach().to("cpu", torch.float64).numpy()
        height, width = self.canvas_hw
        inside = (a64[:, 0] >= 0) & (a64[:, 1] >= 0) & (a64[:, 2] <= width) & (a64[:, 3] <= height)
        inside_idx = np.flatnonzero(inside)
        groups, order, ys_all, xs_all = _shape_groups(a64[inside_idx])
        self._groups = groups
        self.layout = inside_idx[np.concatenate(order)] if order else inside_idx  # column -> anchor index
        ys_cat, xs_cat = _cat(ys_all, 2), _cat(xs_all, 2)
        self._y1, self._y2 = np.ascontiguousarray(ys_cat[:, 0]), np.ascontiguousarray(ys_cat[:, 1])
        self._x1, self._x2 = np.ascontiguousarray(xs_cat[:, 0]), np.ascontiguousarray(xs_cat[:, 1])
        self._a32 = np.ascontiguousarray(a32[self.layout])  # encode() reads the anchors in float32
        self._labels0 = np.full(self.num_anchors, -1, dtype=np.int8)
        self._empty_labels = self._labels0.copy()
        self._empty_labels[inside_idx] = 0
        self.num_inside = int(inside_idx.size)
        self._local = threading.local()
        self._index_groups(groups)
        # The pruned path needs every shape to be a full grid and thresholds above 0.
        self.pruned = all(g.product for g in groups) and min(self.pos_iou, self.neg_iou) > 0
        self._column = np.full(self.num_anchors, -1, dtype=np.intp)  # anchor index -> column
        self._column[self.layout] = np.arange(self.num_inside)
        self._weights = np.array(self.coder.weights, dtype=np.float32)

    def _index_groups(self, groups: list[_Group]) -> None:
        """Per group: where its y- and x-extents start in the tables, its sizes, columns and area;
        per column: its group and the row of its y- and x-extent in the tables."""
        self._g_y0 = np.array([g.ys.start for g in groups], dtype=np.intp)
        self._g_x0 = np.array([g.xs.start for g in groups], dtype=np.intp)
        self._g_nx = np.array([g.nx for g in groups], dtype=np.intp)
        self._g_off = np.array([g.offset for g in groups], dtype=np.intp)
        self._g_area = np.array([g.area for g in groups], dtype=np.float64)
        self._y_group = np.repeat(np.arange(len(groups)), [g.ny for g in groups])
        self._x_group = np.repeat(np.arange(len(groups)), [g.nx for g in groups])
        col_g, col_y, col_x = [], [], []
        for k, g in enumerate(groups):
            col_g.append(np.full(g.size, k, dtype=np.intp))
            if g.product:
                col_y.append(g.ys.start + np.arange(g.size) // g.nx)
                col_x.append(g.xs.start + np.arange(g.size) % g.nx)
            else:
                col_y.append(g.ys.start + g.yinv)
                col_x.append(g.xs.start + g.xinv)
        self._col_g, self._col_y, self._col_x = _cat_index(col_g), _cat_index(col_y), _cat_index(col_x)

    def matches(self, anchors: Tensor, canvas_hw: tuple[int, int], pos_iou: float, neg_iou: float,
                box_coder: BoxCoder | None) -> bool:
        """Whether this creator gives the targets of these arguments (the per-grid cache's test)."""
        weights = (box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))).weights
        if ((int(canvas_hw[0]), int(canvas_hw[1])) != self.canvas_hw or float(pos_iou) != self.pos_iou
                or float(neg_iou) != self.neg_iou or weights != self.coder.weights):
            return False
        if anchors is self.source:
            return anchors._version == self.source_version
        return (anchors.shape == self.source.shape and anchors.device == self.device
                and anchors.dtype == self.source.dtype and torch.equal(anchors, self.source))

    def _buffers(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, num_inside) IoU and union buffers, grown geometrically and kept (per thread)."""
        loc = self._local
        if getattr(loc, "rows", 0) < m:
            loc.rows = max(m, 2 * getattr(loc, "rows", 0), 4)
            loc.iou = np.empty((loc.rows, self.num_inside))
            loc.union = np.empty((loc.rows, self.num_inside))
        return loc.iou[:m], loc.union[:m]

    def iou(self, boxes: Tensor) -> np.ndarray:
        """``(M, num_inside)`` float64 IoU of the boxes with the inside anchors, columns in
        ``self.layout`` order; a view of this thread's work buffer (valid until the next call)."""
        b = boxes.detach().to("cpu", torch.float64).numpy().reshape(-1, 4)
        m = b.shape[0]
        iou, union = self._buffers(m)
        bx1, by1, bx2, by2 = (b[:, k:k + 1] for k in range(4))
        iw = np.minimum(bx2, self._x2) - np.maximum(bx1, self._x1)  # (M, distinct x-extents)
        np.maximum(iw, 0.0, out=iw)
        ih = np.minimum(by2, self._y2) - np.maximum(by1, self._y1)
        np.maximum(ih, 0.0, out=ih)
        barea = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        for g in self._groups:
            cols = slice(g.offset, g.offset + g.size)
            inter, uni = iou[:, cols], union[:, cols]
            if g.product:
                np.multiply(iw[:, None, g.xs], ih[:, g.ys, None], out=inter.reshape(m, g.ny, g.nx))
            else:
                np.multiply(iw[:, g.xs][:, g.xinv], ih[:, g.ys][:, g.yinv], out=inter)
            np.subtract((g.area + barea)[:, None], inter, out=uni)  # (area1 + area2) - inter, as box_iou
            np.divide(inter, uni, out=inter)
        return iou

    def __call__(self, boxes: Tensor) -> AnchorTargets:
        boxes = boxes.reshape(-1, 4)
        if boxes.shape[0] == 0:
            return AnchorTargets(self._out(self._empty_labels.copy()), self._out(np.zeros(0, np.int64)),
                                 self._out(np.zeros((0, 4), np.float32)),
                                 self._out(np.full(self.num_anchors, -1, dtype=np.int64)))
        given = boxes.detach().cpu().numpy()
        b64 = given.astype(np.float64)  # IoU in float64, from the boxes as given (as box_iou was fed)
        iw, ih, barea = self._overlaps(b64)
        labels = self._labels_pruned(b64, iw, ih, barea) if self.pruned else self._labels_dense(boxes)
        anchor_idx = np.flatnonzero(labels == 1)
        cols = self._column[anchor_idx]
        # Each positive's box: its IoU with every box, from the same overlap tables, so the same
        # values as a dense IoU; argmax takes the first of equal IoUs, as the walkthrough's.
        inter = ih[:, self._col_y[cols]] * iw[:, self._col_x[cols]]
        iou = inter / ((self._g_area[self._col_g[cols]] + barea[:, None]) - inter)
        matched_box = iou.argmax(axis=0)
        b32 = given.astype(np.float32, copy=False)
        pos_deltas = _encode_np(b32[matched_box], self._a32[cols], self._weights)
        return AnchorTargets(self._out(labels), self._out(anchor_idx), self._out(pos_deltas),
                             partial(self.matched, boxes))

    def _out(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(a)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _overlaps(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Width of overlap of every box with every distinct anchor x-extent ``(M, X)``, height
        with every y-extent ``(M, Y)`` (clamped at 0), box areas ``(M,)``: box_iou's operations."""
        iw = np.minimum(b[:, 2:3], self._x2) - np.maximum(b[:, 0:1], self._x1)
        np.maximum(iw, 0.0, out=iw)
        ih = np.minimum(b[:, 3:4], self._y2) - np.maximum(b[:, 1:2], self._y1)
        np.maximum(ih, 0.0, out=ih)
        return iw, ih, (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def _labels_dense(self, boxes: Tensor) -> np.ndarray:
        """Labels of all anchors from the full IoU matrix (any anchors)."""
        iou = self.iou(boxes)
        best_of_anchor = iou.max(axis=0)
        best_of_box = iou.max(axis=1)
        lab = np.full(self.num_inside, -1, dtype=np.int8)
        lab[best_of_anchor < self.neg_iou] = 0
        found = best_of_box > 0  # a box that overlaps no inside anchor makes no anchor positive
        if found.any():
            # An anchor that is some box's best has IoU >= that box's best; only those columns can tie.
            cand = np.flatnonzero(best_of_anchor >= best_of_box[found].min())
            is_best = ((iou[:, cand] == best_of_box[:, None]) & found[:, None]).any(axis=0)
            lab[cand[is_best]] = 1
        lab[best_of_anchor >= self.pos_iou] = 1
        labels = self._labels0.copy()
        labels[self.layout] = lab
        return labels

    def _labels_pruned(self, b: np.ndarray, iw: np.ndarray, ih: np.ndarray, barea: np.ndarray) -> np.ndarray:
        """Labels of all anchors, computing IoU only where it can matter.

        Within one (box, shape) block every anchor has the same area, so the IoU is a
        non-decreasing function of the intersection -- also as rounded in float64: fl(I / fl(S - I))
        cannot decrease as I grows -- and the intersection is the product of an overlap height and
        an overlap width. So the block's best IoU comes from the largest height and width, which
        gives every box's best IoU exactly, and an anchor of the block can reach IoU t only if its
        height >= T / (largest width) and its width >= T / (largest height), T = t S / (1 + t)
        (with a 1e-9 margin for rounding). Only those pairs get an IoU, for t = the smaller of the
        thresholds and the box's best: every anchor that is not negative, every positive and every
        tie for a box's best is among them; every other inside anchor has IoU < neg_iou with every box.
        """
        m, n_groups = b.shape[0], self._g_area.size
        max_w = np.maximum.reduceat(iw, self._g_x0, axis=1)  # (M, G)
        max_h = np.maximum.reduceat(ih, self._g_y0, axis=1)
        area = self._g_area + barea[:, None]  # (M, G): area1 + area2, as box_iou
        top = max_w * max_h
        best_of_box = (top / (area - top)).max(axis=1)  # (M,)
        found = best_of_box > 0
        t = np.minimum(min(self.pos_iou, self.neg_iou), best_of_box)
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(found, t / (1.0 + t), np.inf)[:, None] * area * (1.0 - 1e-9)
            need_h = need / max_w * (1.0 - 1e-9)
            need_w = need / max_h * (1.0 - 1e-9)
        rows_h = ih >= need_h[:, self._y_group]  # (M, Y): heights that can reach the threshold
        rows_w = iw >= need_w[:, self._x_group]
        n_h = np.add.reduceat(rows_h, self._g_y0, axis=1).reshape(-1)  # per (box, group), row-major
        n_w = np.add.reduceat(rows_w, self._g_x0, axis=1).reshape(-1)
        count = n_h * n_w
        labels = (self._empty_labels if self.neg_iou > 0 else self._labels0).copy()
        total = int(count.sum())
        if total == 0:
            return labels
        # Every (height, width) pair of every (box, group): a ragged cross product, flattened.
        h_box, h_idx = np.nonzero(rows_h)  # sorted by box, then extent: (box, group) blocks in order
        w_box, w_idx = np.nonzero(rows_w)
        h_start = np.cumsum(n_h) - n_h
        w_start = np.cumsum(n_w) - n_w
        block = np.repeat(np.arange(m * n_groups), count)
        local = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        nw = n_w[block]
        yk = h_idx[h_start[block] + local // nw]
        xk = w_idx[w_start[block] + local % nw]
        bk, gk = np.divmod(block, n_groups)
        inter = ih[bk, yk] * iw[bk, xk]
        iou = inter / (area.reshape(-1)[block] - inter)
        anchor = self.layout[self._g_off[gk] + (yk - self._g_y0[gk]) * self._g_nx[gk] + (xk - self._g_x0[gk])]
        if self.neg_iou > 0:
            labels[anchor[iou >= self.neg_iou]] = -1
        labels[anchor[(iou == best_of_box[bk]) & found[bk]]] = 1
        labels[anchor[iou >= self.pos_iou]] = 1
        return labels

    def matched(self, boxes: Tensor) -> Tensor:
        """``(N,)`` int64: the box each inside anchor overlaps most (first on ties), -1 outside."""
        boxes = boxes.reshape(-1, 4)
        out = np.full(self.num_anchors, -1, dtype=np.int64)
        if boxes.shape[0]:
            out[self.layout] = self.iou(boxes).argmax(axis=0)
        return torch.from_numpy(out).to(self.device)


_CREATORS: OrderedDict[tuple, AnchorTargetCreator] = OrderedDict()
_CREATORS_LOCK = threading.Lock()
_CREATORS_MAX = 8


def anchor_target_creator(anchors: Tensor, canvas_hw: tuple[int, int], pos_iou: float = 0.7,
                          neg_iou: float = 0.3, box_coder: BoxCoder | None = None) -> AnchorTargetCreator:
    """The creator for these anchors and settings, from a small per-process cache (the last few
    grids): the same grid object hits at once, an equal grid after a comparison of the anchors."""
    key = (tuple(anchors.shape), str(anchors.device), tuple(canvas_hw), float(pos_iou), float(neg_iou),
           (box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))).weights)
    with _CREATORS_LOCK:
        for k, c in reversed(_CREATORS.items()):
            if k[0] == key and c.matches(anchors, canvas_hw, pos_iou, neg_iou, box_coder):
                _CREATORS.move_to_end(k)
                return c
    creator = AnchorTargetCreator(anchors, canvas_hw, pos_iou, neg_iou, box_coder)
    with _CREATORS_LOCK:
        _CREATORS[(key, id(creator))] = creator
        while len(_CREATORS) > _CREATORS_MAX:
            _CREATORS.popitem(last=False)
    return creator


def assign_anchor_targets(anchors: Tensor, boxes: Tensor, canvas_hw: tuple[int, int],
                          pos_iou: float = 0.7, neg_iou: float = 0.3,
                          box_coder: BoxCoder | None = None) -> AnchorTargets:
    """Label anchors against ground-truth ``boxes`` (walkthrough's rules, with its flaws fixed).

    - anchors crossing the canvas border are ignored (-1);
    - negative (0) if the max IoU with every box is < ``neg_iou``;
    - positive (1) if the max IoU is >= ``pos_iou``, or if the anchor has the highest IoU of all
      inside anchors for some box (ties included) and that IoU is > 0: a box that overlaps no
      inside anchor makes no anchor positive (the walkthrough made every zero-IoU anchor positive);
    - with no boxes, every inside anchor is negative.
    IoU is computed in float64 so that equal overlaps compare equal.

    Delegates to the grid's :class:`AnchorTargetCreator` (cached per grid); code that labels
    many images on one grid can hold the creator itself.
    """
    return anchor_target_creator(anchors, canvas_hw, pos_iou, neg_iou, box_coder)(boxes)


def random_subset(mask: Tensor, k: Tensor, keys: Tensor) -> Tensor:
    """``k`` (per row, a tensor) of the True entries of ``mask`` (..., N), those with the lowest
    ``keys`` (uniform draws: a random subset), as a mask: shapes stay fixed, nothing waits for the
    host (no ``nonzero``, no counts read back)."""
    prio = torch.where(mask, keys, torch.full_like(keys, 2.0))
    order = prio.argsort(dim=-1)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(
        mask.shape[-1], device=mask.device).expand_as(order))
    return mask & (rank < k.unsqueeze(-1))


def sample_anchor_labels(labels: Tensor, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                         generator: torch.Generator | None = None) -> Tensor:
    """Draw a fresh balanced sample from ``(B, N)`` anchor labels; the unsampled become -1.

    At most ``positive_fraction * batch_size_per_image`` positives, negatives fill the rest.
    """
    labels = labels.long()
    pos = labels == 1
    neg = labels == 0
    num_pos = torch.clamp(pos.sum(1), max=int(batch_size_per_image * positive_fraction))
    num_neg = torch.minimum(neg.sum(1), batch_size_per_image - num_pos)
    keys = torch.rand(labels.shape, generator=generator, device=labels.device)
    out = torch.full_like(labels, -1)
    for mask, k, value in ((pos, num_pos, 1), (neg, num_neg, 0)):
        out = torch.where(random_subset(mask, k, keys), value, out)
    return out


def hflip_anchor_index(index: Tensor, feat_w: int, num_anchors: int) -> Tensor:
    """Map flattened anchor indices to those of the horizontally mirrored grid."""
    a = index % num_anchors
    cell = index // num_anchors
    y = cell // feat_w
    x = cell % feat_w
    return (y * feat_w + (feat_w - 1 - x)) * num_anchors + a


def hflip_anchor_targets(labels: Tensor, deltas: Tensor, feat_hw: tuple[int, int],
                         num_anchors: int) -> tuple[Tensor, Tensor]:
    """Targets of a horizontally flipped canvas, from those of the original: the grid is mirrored
    along x and dx changes sign (anchors are symmetric, so dy, dw, dh are unchanged).

    ``labels``: ``(..., H*W*A)``; ``deltas``: ``(..., H*W*A, 4)``.
    """
    h, w = feat_hw
    lead = labels.shape[:-1]
    labels = labels.reshape(*lead, h, w, num_anchors).flip(-2).reshape(*lead, -1)
    deltas = deltas.reshape(*lead, h, w, num_anchors, 4).flip(-3).reshape(*lead, -1, 4)
    deltas = deltas * deltas.new_tensor([-1.0, 1.0, 1.0, 1.0])
    return labels, deltas
