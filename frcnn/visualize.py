"""Visual diagnostics: PR curves, detection overlays, image grids.

Contract
--------
* Boxes/labels follow ``frcnn.evaluation``: float ``[x1, y1, x2, y2]`` in 0-based
  continuous pixel coordinates of the image being drawn on; labels ``1..C`` with
  label ``k`` named ``class_names[k - 1]``.
* ``gt`` dicts have ``boxes`` / ``labels`` (optional ``difficult``); ``det`` dicts
  have ``boxes`` / ``scores`` / ``labels``.  Arrays may be numpy, lists or CPU
  tensors.
* Functions never mutate their input images; they return new RGB images.
* Plots use matplotlib's object API with an explicit Agg canvas (no pyplot), so
  importing this module never switches the process-wide backend and works on
  headless workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from frcnn.evaluation import VocResult

__all__ = ["class_color", "count_misses", "draw_detections", "image_grid", "plot_pr_curves", "select_grid_images"]

GT_COLOR = (0, 255, 0)
# tab20-like palette without pure green, so predictions never look like GT.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232),
    (255, 187, 120), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
    (199, 199, 199), (219, 219, 141), (158, 218, 229), (57, 59, 121), (132, 60, 57),
)  # fmt: skip


def class_color(label: int) -> tuple[int, int, int]:
    """Stable RGB colour for a 1-based class label (shared by plots and overlays)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def _mpl_color(label: int) -> tuple[float, float, float]:
    r, g, b = class_color(label)
    return (r / 255.0, g / 255.0, b / 255.0)


# --------------------------------------------------------------------------- #
# PR curves
# --------------------------------------------------------------------------- #
def plot_pr_curves(result: VocResult, path: str | os.PathLike[str]) -> None:
    """Save one PNG with a precision-recall curve per class (legend shows AP).

    Classes without ground truth (NaN AP) or without detections have no curve
    but stay in the legend, so the table of classes is complete.
    """
    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to the figure
    ax = fig.add_subplot(1, 1, 1)
    for label, name in enumerate(result.ap, start=1):
        ap = result.ap[name]
        rec, prec = result.recall[name], result.precision[name]
        text = f"{name} (AP {ap:.3f})" if not math.isnan(ap) else f"{name} (AP n/a)"
        if rec.size and not math.isnan(ap):
            ax.plot(rec, prec, color=_mpl_color(label), linewidth=1.5, label=text)
        else:
            ax.plot([], [], color=_mpl_color(label), linestyle=":", label=text)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall per class (mAP {result.map:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", ncol=2 if len(result.ap) > 10 else 1)
    fig.tight_layout()
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")


# --------------------------------------------------------------------------- #
# Detection overlays
# --------------------------------------------------------------------------- #
def _pixel_rect(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """Continuous [x1, y1, x2, y2] -> inclusive PIL pixel rect, clipped; None if off-image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    # Pixel i covers [i, i + 1): the last covered pixel of x2 is ceil(x2) - 1.
    left, top = max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0)
    right, bottom = min(int(math.ceil(x2)) - 1, width - 1), min(int(math.ceil(y2)) - 1, height - 1)
    if right < left or bottom < top:
        return None
    return left, top, right, bottom


def _dashed_rect(
    draw: ImageDraw.ImageDraw, rect: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
    # PIL has no dash style; dashes keep GT visually distinct from predictions.
    left, top, right, bottom = rect
    dash, gap = 4, 3
    for x in range(left, right + 1, dash + gap):
        x_end = min(x + dash - 1, right)
        draw.line([(x, top), (x_end, top)], fill=color)
        draw.line([(x, bottom), (x_end, bottom)], fill=color)
    for y in range(top, bottom + 1, dash + gap):
        y_end = min(y + dash - 1, bottom)
        draw.line([(left, y), (left, y_end)], fill=color)
        draw.line([(right, y), (right, y_end)], fill=color)


def _label_text(
    draw: ImageDraw.ImageDraw,
    rect: tuple[int, int, int, int],
    text: str,
    color: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    # Text sits above the box, or just inside it when the box touches the top edge.
    tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
    tw, th = tr - tl + 2, tb - tt + 2
    y = rect[1] - th if rect[1] - th >= 0 else rect[1]
    draw.rectangle([rect[0], y, rect[0] + tw, y + th], fill=color)
    # Black text on light class colours, white on dark ones, for legibility.
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((rect[0] + 1 - tl, y + 1 - tt), text, fill=ink, font=font)


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"class{label}"


def draw_detections(
    image: Image.Image,
    gt: Mapping[str, Any] | None,
    det: Mapping[str, Any] | None,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
) -> Image.Image:
    """Overlay ground truth and predictions on a copy of ``image`` (RGB, same size).

    Ground truth: thin dashed green boxes.  Predictions with
    ``score >= score_threshold``: 2-px boxes in the class colour (``class_color``)
    with a ``"name 0.87"`` label, drawn lowest score first so the most confident
    labels end up on top.
    """
    out = image.convert("RGB")  # convert() always returns a new image
    draw = ImageDraw.Draw(out)
    width, height = out.size
    if gt is not None:
        for box in np.asarray(gt["boxes"], dtype=np.float64).reshape(-1, 4):
            rect = _pixel_rect(box, width, height)
            if rect is not None:
                _dashed_rect(draw, rect, GT_COLOR)
    if det is not None:
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)
        font = ImageFont.load_default()
        for i in np.argsort(scores, kind="stable"):
            if scores[i] < score_threshold:
                continue
            rect = _pixel_rect(boxes[i], width, height)
            if rect is None:
                continue
            color = class_color(int(labels[i]))
            draw.rectangle(rect, outline=color, width=2)
            text = f"{_class_name(int(labels[i]), class_names)} {scores[i]:.2f}"
            _label_text(draw, rect, text, color, font)
    return out


# --------------------------------------------------------------------------- #
# Grids
# --------------------------------------------------------------------------- #
def image_grid(
    images: Sequence[Image.Image], cols: int = 4, cell: int = 256
) -> Image.Image:
    """Tile images into one RGB image of ``cell``-sized squares, row-major.

    Each image is resized (up or down) to fit ``cell x cell`` with its aspect ratio
    kept, centred and padded black.  The grid has ``min(cols, n)`` columns and
    ``ceil(n / columns)`` rows, i.e. size ``(columns * cell, rows * cell)``.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols < 1 or cell < 1:
        raise ValueError(f"cols and cell must be positive, got cols={cols}, cell={cell}")
    columns = min(cols, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), (0, 0, 0))
    for k, img in enumerate(images):
        tile = ImageOps.contain(img.convert("RGB"), (cell, cell))
        x = (k % columns) * cell + (cell - tile.width) // 2
        y = (k // columns) * cell + (cell - tile.height) // 2
        grid.paste(tile, (x, y))
    return grid


# --------------------------------------------------------------------------- #
# Which images an evaluation shows
# --------------------------------------------------------------------------- #
GRID_SCORE_THRESHOLD = 0.3  # draw_detections' default: what is drawn is what counts as found


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, N) IoU of 0-based continuous xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def count_misses(gt: Mapping[str, Any], det: Mapping[str, Any] | None,
                 score_threshold: float = GRID_SCORE_THRESHOLD, iou_threshold: float = 0.5) -> int:
    """Non-difficult objects without a same-class detection (score >= threshold, IoU >= 0.5)."""
    boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
    keep = ~np.asarray(gt.get("difficult", np.zeros(len(boxes), bool)), bool)
    boxes, labels = boxes[keep], np.asarray(gt["labels"])[keep]
    if not len(boxes):
        return 0
    if det is None:
        return len(boxes)
    sel = np.asarray(det["scores"]).reshape(-1) >= score_threshold
    d_boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)[sel]
    d_labels = np.asarray(det["labels"]).reshape(-1)[sel]
    if not len(d_boxes):
        return len(boxes)
    iou = _iou(boxes, d_boxes)
    iou[labels[:, None] != d_labels[None, :]] = 0.0
    return int((iou.max(axis=1) < iou_threshold).sum())


def select_grid_images(image_ids: Sequence[str], ground_truth: Mapping[str, Mapping[str, Any]],
                       detections: Mapping[str, Mapping[str, Any]], n: int = 12) -> list[str]:
    """A deterministic choice of ``n`` of ``image_ids``: up to half the images with the most misses,
    the rest spread evenly over the list, returned in list order."""
    usable = list(image_ids)
    if not usable:
        return []
    misses = {i: count_misses(ground_truth[i], detections.get(i)) for i in usable}
    missed = sorted((i for i in usable if misses[i] > 0), key=lambda i: (-misses[i], i))[: n // 2]
    rest = [i for i in usable if i not in set(missed)]
    k = min(n - len(missed), len(rest))
    chosen = set(missed) | {rest[int(j * len(rest) / k)] for j in range(k)}
    return [i for i in usable if i in chosen]
