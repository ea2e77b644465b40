"""Anchor coverage: which ground-truth boxes the anchors can learn, per COCO size, before training.

A box is **covered** when its best anchor (inside the canvas) overlaps it with IoU >= ``min_iou``,
by default the RPN's ``neg_iou`` (0.3). Under the labelling rules every box with any overlap gets
its best anchor as a positive; below ``neg_iou`` that positive is an anchor the rules would
otherwise call background, a match the regression cannot close (mmdetection's RPN assigner
refuses such matches: ``min_pos_iou=0.3``). The best-anchor IoU distribution, and the share of
boxes at IoU >= ``pos_iou`` (0.7: a positive by the threshold rule), say how good the matches are.
Sizes are COCO's, by box area in the original image's pixels: small < 32², medium < 96², large.

    meter = CoverageMeter(anchors, (H, W))          # once per canvas grid
    best = meter.best_iou(canvas_boxes)              # (M,) per image: the best anchor IoU of each box
    stats = CoverageStats.empty(min_iou=0.3, pos_iou=0.7)
    stats.add(best, original_areas, canvas_boxes)    # cheap counts; stats merge across workers
    line = warning_line(stats, stride, scales, ratios)   # None, or one line naming what would cover the misses

:func:`suggest` names the anchor scales or ratios whose shape would match the missed boxes (IoU
>= ``pos_iou`` with box and anchor on one centre, the best any grid position can give), greedily;
boxes whose shape an anchor already matches but which fall between anchor centres are counted
apart: they need a finer stride, not another anchor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BUCKETS", "CoverageMeter", "CoverageStats", "Suggestion", "plot_coverage", "size_buckets",
           "suggest", "warning_line"]

BUCKETS = ("small", "medium", "large")
_SMALL, _MEDIUM = 32.0**2, 96.0**2  # COCO's area limits
IOU_BINS = 100
_SHAPE_BINS = 4  # missed boxes are binned by quarter octaves of size and of aspect ratio
_MAX_ADDITIONS = 4


def size_buckets(areas: np.ndarray) -> np.ndarray:
    """COCO size of each area: 0 small (< 32²), 1 medium (< 96²), 2 large."""
    areas = np.asarray(areas, dtype=np.float64)
    return (areas >= _SMALL).astype(np.int64) + (areas >= _MEDIUM)


def _numpy(x) -> np.ndarray:
    """A torch tensor or array-like -> float64 numpy (torch is not imported here)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class CoverageMeter:
    """The best IoU of boxes with the inside anchors of one grid (``frcnn.anchors.grid_anchors``).

    Anchors crossing the canvas border are left out, as in the RPN's labels. On a grid, one
    anchor shape's inside anchors are every pair of an inside x-extent and an inside y-extent, and
    at a fixed shape the IoU grows with the intersection, so a box's best IoU with a shape is that
    of its widest x-overlap times its tallest y-overlap: O(boxes x extents), not x anchors.
    """

    def __init__(self, anchors, canvas_hw: tuple[int, int]) -> None:
        a = _numpy(anchors).reshape(-1, 4)
        height, width = canvas_hw
        a = a[(a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] <= width) & (a[:, 3] <= height)]
        shapes, shape_of = np.unique(np.stack((a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]), 1), axis=0,
                                     return_inverse=True)
        xs, ys, self._x0, self._y0, areas = [], [], [], [], []
        for g in range(shapes.shape[0]):
            member = a[shape_of.reshape(-1) == g]
            gx, gy = np.unique(member[:, [0, 2]], axis=0), np.unique(member[:, [1, 3]], axis=0)
            if len(gx) * len(gy) != len(member):
                raise ValueError("CoverageMeter needs grid anchors (every x-extent with every y-extent)")
            self._x0.append(sum(len(x) for x in xs))
            self._y0.append(sum(len(y) for y in ys))
            xs.append(gx)
            ys.append(gy)
            areas.append(shapes[g, 0] * shapes[g, 1])
        self._xs = np.concatenate(xs) if xs else np.zeros((0, 2))
        self._ys = np.concatenate(ys) if ys else np.zeros((0, 2))
        self._areas = np.asarray(areas, dtype=np.float64)

    def best_iou(self, boxes) -> np.ndarray:
        """``(M,)`` float64: each box's highest IoU with an inside anchor (0 with none inside);
        ``boxes`` (M, 4) canvas xyxy, numpy or torch."""
        b = _numpy(boxes).reshape(-1, 4)
        if b.shape[0] == 0 or self._areas.size == 0:
            return np.zeros(b.shape[0])
        iw = np.maximum(np.minimum(b[:, 2:3], self._xs[:, 1]) - np.maximum(b[:, 0:1], self._xs[:, 0]), 0.0)
        ih = np.maximum(np.minimum(b[:, 3:4], self._ys[:, 1]) - np.maximum(b[:, 1:2], self._ys[:, 0]), 0.0)
        inter = np.maximum.reduceat(iw, self._x0, axis=1) * np.maximum.reduceat(ih, self._y0, axis=1)  # (M, shapes)
        barea = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        return (inter / (self._areas + barea[:, None] - inter)).max(axis=1)


@dataclass
class CoverageStats:
    """Counts over boxes, per size (:data:`BUCKETS`): ``boxes``, ``covered``, ``iou_sum``, ``hist``
    (best anchor IoU in ``IOU_BINS`` bins over [0, 1]) and ``missed``: the uncovered boxes binned by
    canvas shape, ``(size bin, ratio bin) -> [count, sum log2 sqrt(w h), sum log2 (h / w)]``.
    Adding and merging are sums, so workers count their images and the driver merges."""

    min_iou: float
    pos_iou: float
    boxes: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    covered: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    iou_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float64))
    hist: np.ndarray = field(default_factory=lambda: np.zeros((3, IOU_BINS), np.int64))
    missed: dict[tuple[int, int], list[float]] = field(default_factory=dict)

    @classmethod
    def empty(cls, min_iou: float, pos_iou: float) -> CoverageStats:
        return cls(float(min_iou), float(pos_iou))

    def add(self, best_iou: np.ndarray, areas: np.ndarray, canvas_boxes: np.ndarray) -> None:
        """Count boxes: their best anchor IoU, original-image areas and ``(M, 4)`` canvas boxes."""
        best = np.asarray(best_iou, dtype=np.float64).reshape(-1)
        if best.size == 0:
            return
        bucket = size_buckets(areas)
        ok = best >= self.min_iou
        np.add.at(self.boxes, bucket, 1)
        np.add.at(self.covered, bucket, ok.astype(np.int64))
        np.add.at(self.iou_sum, bucket, best)
        np.add.at(self.hist, (bucket, np.minimum((best * IOU_BINS).astype(np.int64), IOU_BINS - 1)), 1)
        cb = np.asarray(canvas_boxes, dtype=np.float64).reshape(-1, 4)[~ok]
        w = np.maximum(cb[:, 2] - cb[:, 0], 1e-6)
        h = np.maximum(cb[:, 3] - cb[:, 1], 1e-6)
        log_size, log_ratio = 0.5 * np.log2(w * h), np.log2(h / w)
        keys = zip(np.rint(log_size * _SHAPE_BINS).astype(int).tolist(),
                   np.rint(log_ratio * _SHAPE_BINS).astype(int).tolist(), strict=True)
        for key, s, r in zip(keys, log_size.tolist(), log_ratio.tolist(), strict=True):
            acc = self.missed.setdefault(key, [0.0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += s
            acc[2] += r

    def merge(self, other: CoverageStats) -> None:
        self.boxes += other.boxes
        self.covered += other.covered
        self.iou_sum += other.iou_sum
        self.hist += other.hist
        for key, (n, s, r) in other.missed.items():
            acc = self.missed.setdefault(key, [0.0, 0.0, 0.0])
            acc[0] += n
            acc[1] += s
            acc[2] += r

    def to_dict(self) -> dict:
        """JSON-able (the ledger's transport and the manifest)."""
        return {"min_iou": self.min_iou, "pos_iou": self.pos_iou, "boxes": self.boxes.tolist(),
                "covered": self.covered.tolist(), "iou_sum": self.iou_sum.tolist(), "hist": self.hist.tolist(),
                "missed": [[i, j, *v] for (i, j), v in sorted(self.missed.items())]}

    @classmethod
    def merged(cls, parts, min_iou: float, pos_iou: float) -> CoverageStats:
        """The sum of ``to_dict`` parts (workers' counts)."""
        out = cls.empty(min_iou, pos_iou)
        for d in parts:
            out.merge(cls.from_dict(d))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CoverageStats:
        return cls(float(d["min_iou"]), float(d["pos_iou"]), np.asarray(d["boxes"], np.int64),
                   np.asarray(d["covered"], np.int64), np.asarray(d["iou_sum"], np.float64),
                   np.asarray(d["hist"], np.int64),
                   {(int(m[0]), int(m[1])): [float(x) for x in m[2:]] for m in d["missed"]})

    def coverage(self, bucket: int | None = None) -> float | None:
        """Share of covered boxes (all sizes, or one); None without boxes."""
        n = int(self.boxes.sum() if bucket is None else self.boxes[bucket])
        return (int(self.covered.sum() if bucket is None else self.covered[bucket]) / n) if n else None

    def iou_quantile(self, q: float, bucket: int | None = None) -> float | None:
        """The ``q`` quantile of the best anchor IoU, to the bin (upper edge of the bin reaching it)."""
        hist = self.hist.sum(axis=0) if bucket is None else self.hist[bucket]
        n = int(hist.sum())
        if not n:
            return None
        k = int(np.searchsorted(np.cumsum(hist), q * n))  # first bin whose cumulative count reaches q n
        return (min(k, IOU_BINS - 1) + 1) / IOU_BINS

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``anchor_coverage[_SIZE]``, ``anchor_boxes[_SIZE]``, the best-IoU mean,
        quantiles (to the bin) and share at ``pos_iou`` or more (to the bin: ``pos_iou`` on an edge)."""
        out: dict[str, float] = {}
        for k, name in [(None, "")] + [(i, f"_{b}") for i, b in enumerate(BUCKETS)]:
            n = int(self.boxes.sum() if k is None else self.boxes[k])
            out[f"anchor_boxes{name}"] = n
            if n:
                out[f"anchor_coverage{name}"] = self.coverage(k)
                out[f"anchor_best_iou_mean{name}"] = float(self.iou_sum.sum() if k is None else self.iou_sum[k]) / n
        hist = self.hist.sum(axis=0)
        if hist.sum():
            out["anchor_share_at_pos_iou"] = float(hist[int(round(self.pos_iou * IOU_BINS)):].sum() / hist.sum())
            for q in (0.1, 0.5):
                out[f"anchor_best_iou_p{int(q * 100)}"] = self.iou_quantile(q)
        return out


@dataclass(frozen=True)
class Suggestion:
    """What would cover the missed boxes: ``scales`` and ``ratios`` to add, each with the boxes it
    newly matches (greedy, in order); ``between``: boxes an anchor shape already matches that fall
    between anchor centres; ``left``: boxes still unmatched after the additions."""

    scales: tuple[tuple[float, int], ...] = ()
    ratios: tuple[tuple[float, int], ...] = ()
    between: int = 0
    left: int = 0


def _shape_iou(bw: np.ndarray, bh: np.ndarray, aw: np.ndarray, ah: np.ndarray) -> np.ndarray:
    """IoU of boxes (B,) and anchor shapes (S,) on one centre: (B, S)."""
    inter = np.minimum(bw[:, None], aw) * np.minimum(bh[:, None], ah)
    return inter / (bw[:, None] * bh[:, None] + aw * ah - inter)


def _matched(bw, bh, stride: float, scales, ratios, pos_iou: float) -> np.ndarray:
    """(B,) whether some anchor shape (scale x ratio, ``frcnn.anchors.cell_anchors``) matches each box."""
    s = np.repeat(np.asarray(scales, np.float64), len(ratios)) * stride
    r = np.tile(np.asarray(ratios, np.float64), len(scales))
    return (_shape_iou(bw, bh, s / np.sqrt(r), s * np.sqrt(r)) >= pos_iou - 1e-12).any(axis=1)


def suggest(stats: CoverageStats, stride: float, scales, ratios) -> Suggestion:
    """Greedy: add the scale or ratio (each missed shape's own) that matches the most missed
    boxes, or the best pair when no single one matches any, until all match, four are added, or
    the next would match fewer than a tenth of the missed boxes."""
    if not stats.missed:
        return Suggestion()
    v = np.asarray(list(stats.missed.values()), dtype=np.float64)
    n, size, ratio = v[:, 0], np.exp2(v[:, 1] / v[:, 0]), np.exp2(v[:, 2] / v[:, 0])
    bw, bh = size / np.sqrt(ratio), size * np.sqrt(ratio)
    scales, ratios = [float(x) for x in scales], [float(x) for x in ratios]
    todo = ~_matched(bw, bh, stride, scales, ratios, stats.pos_iou)
    between = int(n[~todo].sum())
    heavy = np.argsort(-n)[:30]  # candidates: the most frequent missed shapes' own scale and ratio
    cand_s = sorted({float(f"{x:.2g}") for x in size[heavy] / stride})
    cand_r = sorted({float(f"{x:.2g}") for x in ratio[heavy]})
    added_s: list[tuple[float, int]] = []
    added_r: list[tuple[float, int]] = []

    def gain(new_s, new_r) -> int:
        ok = _matched(bw[todo], bh[todo], stride, scales + new_s, ratios + new_r, stats.pos_iou)
        return int(n[todo][ok].sum())

    while todo.any() and len(added_s) + len(added_r) < _MAX_ADDITIONS:
        options = [(gain([c], []), [c], []) for c in cand_s] + [(gain([], [c]), [], [c]) for c in cand_r]
        best = max(options, key=lambda o: o[0], default=(0, [], []))
        if best[0] == 0:
            pairs = [(gain([s], [r]), [s], [r]) for s in cand_s for r in cand_r]
            best = max(pairs, key=lambda o: o[0], default=(0, [], []))
            if best[0] == 0:
                break
        got, new_s, new_r = best
        if (added_s or added_r) and got < 0.1 * n.sum():
            break
        scales, ratios = scales + new_s, ratios + new_r
        added_s += [(x, got) for x in new_s]
        added_r += [(x, got) for x in new_r]
        todo[todo] = ~_matched(bw[todo], bh[todo], stride, scales, ratios, stats.pos_iou)
    return Suggestion(tuple(added_s), tuple(added_r), between, int(n[todo].sum()))


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def warning_line(stats: CoverageStats, stride: float, scales, ratios, threshold: float = 0.9) -> str | None:
    """One line when coverage is below ``threshold`` overall, or for a size holding at least 10 %
    of the boxes; None otherwise."""
    total = int(stats.boxes.sum())
    if not total:
        return None
    low = [i for i in range(3) if stats.boxes[i] >= 0.1 * total and stats.coverage(i) < threshold]
    if stats.coverage() >= threshold and not low:
        return None
    sizes = ", ".join(f"{b} {_pct(stats.coverage(i))} of {int(stats.boxes[i])}"
                      for i, b in enumerate(BUCKETS) if stats.boxes[i])
    s = suggest(stats, stride, scales, ratios)
    adds = [f"scale {x:g} ({_boxes(k)})" for x, k in s.scales] + [f"ratio {x:g} ({_boxes(k)})" for x, k in s.ratios]
    fix = f"add anchor {', '.join(adds)}" if adds else "no added scale or ratio matches them"
    tail = f"; {_boxes(s.between)} fall between anchor centres (stride {stride:g})" if s.between else ""
    return (f"anchor coverage {_pct(stats.coverage())} of {total} boxes have an anchor at IoU >= "
            f"{stats.min_iou:g} ({sizes}), under {_pct(threshold)}: {fix}{tail}")


def _boxes(k: int) -> str:
    return f"{k} box" if k == 1 else f"{k} boxes"


def plot_coverage(stats: CoverageStats, path: str, title: str = "anchor coverage") -> None:
    """A PNG: covered share per size (bars, box counts on top) and the best-anchor IoU distribution."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    shares = [stats.coverage(i) or 0.0 for i in range(3)]
    bars = ax1.bar(BUCKETS, shares, color=["#d62728", "#ff7f0e", "#2ca02c"])
    for bar, k in zip(bars, stats.boxes.tolist(), strict=True):
        ax1.annotate(f"{k} boxes", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                     va="bottom", fontsize=8)
    ax1.set_ylim(0, 1.1)
    ax1.set_ylabel(f"share with an anchor at IoU >= {stats.min_iou:g}")
    edges = np.linspace(0, 1, IOU_BINS + 1)
    for i, name in enumerate(BUCKETS):
        if stats.boxes[i]:
            ax2.stairs(stats.hist[i], edges, label=name)
    for x in (stats.min_iou, stats.pos_iou):
        ax2.axvline(x, color="k", ls="--", lw=1)
    ax2.set_xlabel("best anchor IoU of a box")
    ax2.set_ylabel("boxes")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
