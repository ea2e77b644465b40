"""Synthetic shapes dataset written in PASCAL VOC layout (embedded default: no download).

Five classes told apart by *shape* only (colours are random per object, so a model
cannot cheat on colour): ellipse, rectangle, triangle, cross, diamond.  Images have
random sizes (many aspect ratios) and textured backgrounds; about 10 % of objects are
cut by the image border (``<truncated>1``), about 5 % are very small or low contrast
(``<difficult>1``) and about 3 % of images contain nothing.

Every recorded box is the tight box of the object's *visible* pixels (computed from a
label map after all objects are drawn), converted to VOC coordinates with
:func:`pipelines.voc.xyxy_to_voc`.  Generation is deterministic: image ``i`` depends
only on ``(seed, i)``, so the same seed gives byte-identical files and a smaller
``n_images`` yields a prefix of a larger run.
"""

from __future__ import annotations

import io
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines.synth_layouts import CocoWriter, YoloWriter, category_ids
from pipelines.voc import CLASSES_FILE, xyxy_to_voc

__all__ = ["CATEGORY_IDS", "SYNTH_CLASSES", "SPLITS", "VOC_LIKE_SIZES", "generate", "render_image", "shape_mask"]

SYNTH_CLASSES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "cross", "diamond")
# An approximation of PASCAL VOC 2007's image sizes (long side 500 px; landscape 500x375 and
# 500x333 most common, then their portrait forms), weighted by repetition: for ``generate(sizes=)``
# when a generated dataset should cost what VOC costs to decode and resize. Not VOC's exact mix.
VOC_LIKE_SIZES: tuple[tuple[int, int], ...] = (
    *[(500, 375)] * 9, *[(500, 333)] * 4, *[(375, 500)] * 3, (333, 500), (500, 400), (500, 281),
    (400, 500), (500, 500),
)
SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
CATEGORY_IDS = category_ids(SYNTH_CLASSES)  # the COCO layout's: 1, 3, 5, 7, 9
YEAR_DIR = "VOC2007"
JPEG_QUALITY = 90

_TRAIN_FRACTION, _VAL_FRACTION = 0.70, 0.15  # test gets the rest
_P_EMPTY_IMAGE = 0.03
_P_TRUNCATED = 0.10
_P_DIFFICULT = 0.05
_MAX_IOU = 0.3  # overlap allowed between object boxes
_MAX_HIDDEN = 0.25  # share of an earlier object's visible pixels a new one may cover
_PLACEMENT_TRIES = 30
_COARSE = 8  # background colour field grid step, pixels
_MIN_COLOUR_CONTRAST = 60.0  # RGB distance to every sampled background pixel
_MIN_MEAN_CONTRAST = 100.0  # RGB distance to the mean background under the object
_MIN_COLOUR_GAP = 60.0  # between objects of one image, so their pixels never coincide
# Shapes whose identity survives stretching get a wide aspect range; triangles and
# crosses get a narrow one so they stay recognisable.
_ASPECT_RANGE = {"ellipse": 2.0, "rectangle": 2.0, "diamond": 2.0, "triangle": 1.33, "cross": 1.33}


# --------------------------------------------------------------------------- shapes


def shape_mask(name: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(h, w)`` mask of a shape that touches all four edges of its canvas.

    The mask is cropped to its own bounding box, so its shape *is* the object's box
    (it may come out a pixel smaller than requested for odd polygon rasterisations).
    """
    width, height = max(int(width), 2), max(int(height), 2)
    if name == "rectangle":
        return np.ones((height, width), dtype=bool)
    if name == "cross":
        mask = np.zeros((height, width), dtype=bool)
        thickness = rng.uniform(0.25, 0.4)
        th, tw = max(1, round(height * thickness)), max(1, round(width * thickness))
        top, left = (height - th) // 2, (width - tw) // 2
        mask[top : top + th, :] = True
        mask[:, left : left + tw] = True
        return mask
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    r, b = width - 1, height - 1  # PIL coordinates are inclusive pixel centres
    if name == "ellipse":
        draw.ellipse((0, 0, r, b), fill=255)
    elif name == "diamond":
        draw.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=255)
    elif name == "triangle":
        corners = {
            0: [(0, b), (r, b), (r / 2, 0)],  # apex up
            1: [(0, 0), (r, 0), (r / 2, b)],  # apex down
            2: [(r, 0), (r, b), (0, b / 2)],  # apex left
            3: [(0, 0), (0, b), (r, b / 2)],  # apex right
        }[int(rng.integers(4))]
        draw.polygon(corners, fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {SYNTH_CLASSES}")
    return _crop_to_content(np.asarray(canvas) > 0)


def _crop_to_content(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# --------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth gradient + soft colour blobs + faint stripes + noise, uint8 ``(h, w, 3)``."""
    # The low-frequency colour field is computed on a coarse grid and upsampled: float maths at
    # full resolution (h, w, 3) would dominate the generation time.
    cw, ch = -(-width // _COARSE) + 1, -(-height // _COARSE) + 1
    xs = np.linspace(0.0, width, cw, dtype=np.float32)
    ys = np.linspace(0.0, height, ch, dtype=np.float32)
    c0, c1 = rng.uniform(40.0, 215.0, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    px, py = xs * math.cos(theta), ys * math.sin(theta)
    lo, span = px.min() + py.min(), max(float(np.ptp(px) + np.ptp(py)), 1.0)
    t = (py[:, None] + px[None, :] - lo) / span
    field = c0 + t[..., None] * (c1 - c0)
    for _ in range(int(rng.integers(2, 5))):
        sigma = rng.uniform(0.08, 0.3) * min(width, height)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        gx = np.exp(-0.5 * ((xs - cx) / sigma) ** 2)
        gy = np.exp(-0.5 * ((ys - cy) / sigma) ** 2)
        tint = rng.uniform(-25.0, 25.0, size=3).astype(np.float32)
        field += (gy[:, None] * gx[None, :])[..., None] * tint
    coarse = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8), mode="RGB")
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)

    # Luminance-only detail at full resolution: stripes via sin(a+b) = sin a cos b + cos a sin b,
    # two outer products instead of a 2-D sin.
    phi, period = rng.uniform(0.0, math.pi), rng.uniform(10.0, 60.0)
    phase, amp = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(3.0, 9.0)
    k = 2.0 * math.pi / period
    a = np.arange(width, dtype=np.float32) * np.float32(k * math.cos(phi)) + np.float32(phase)
    b = np.arange(height, dtype=np.float32) * np.float32(k * math.sin(phi))
    detail = np.outer(np.cos(b), np.sin(a)) + np.outer(np.sin(b), np.cos(a))
    detail *= np.float32(amp)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    detail += noise * np.float32(rng.uniform(2.0, 6.0))
    out = smooth + np.rint(detail).astype(np.int16)[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- colours


def _pick_colour(
    rng: np.random.Generator, region: np.ndarray, taken: list[np.ndarray], low_contrast: bool
) -> np.ndarray:
    """A colour that stands out from ``region`` (or barely does, for difficult objects)."""
    sample = region[::3, ::3].reshape(-1, 3).astype(np.float32)
    mean = sample.mean(axis=0)
    if low_contrast:
        offset = rng.uniform(18.0, 30.0) * rng.choice([-1.0, 1.0])
        return np.clip(np.round(mean + offset), 0, 255).astype(np.uint8)
    candidates = rng.integers(0, 256, size=(16, 3)).astype(np.float32)
    for colour in candidates:
        nearest_bg = np.sqrt(((sample - colour) ** 2).sum(axis=1)).min()
        if (
            nearest_bg >= _MIN_COLOUR_CONTRAST
            and np.linalg.norm(colour - mean) >= _MIN_MEAN_CONTRAST
            and all(np.linalg.norm(colour - t) >= _MIN_COLOUR_GAP for t in taken)
        ):
            return colour.astype(np.uint8)
    # Fallback: the RGB cube corner farthest from the background, nudged off the
    # colours already in use so every object keeps a unique colour.
    corner = np.where(mean < 128, 255.0, 0.0)
    for step in range(0, 256, 64):
        colour = np.abs(corner - step)
        if all(np.linalg.norm(colour - t) >= _MIN_COLOUR_GAP for t in taken):
            break
    return colour.astype(np.uint8)


# --------------------------------------------------------------------------- rendering


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _sample_placement(
    rng: np.random.Generator, width: int, height: int
) -> tuple[str, np.ndarray, int, int, bool, bool, bool]:
    """Shape, mask, top-left corner (may be negative), and truncated/small/low-contrast flags."""
    name = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
    difficult = rng.random() < _P_DIFFICULT
    small = difficult and rng.random() < 0.5
    low_contrast = difficult and not small
    short = min(width, height)
    side = short * (rng.uniform(0.05, 0.08) if small else rng.uniform(0.12, 0.6))
    aspect = math.exp(rng.uniform(-1.0, 1.0) * math.log(_ASPECT_RANGE[name]))
    bw = int(np.clip(round(side * math.sqrt(aspect)), 6, width))
    bh = int(np.clip(round(side / math.sqrt(aspect)), 6, height))
    mask = shape_mask(name, bw, bh, rng)
    mh, mw = mask.shape

    truncated = not small and rng.random() < _P_TRUNCATED
    x0 = int(rng.integers(0, width - mw + 1))
    y0 = int(rng.integers(0, height - mh + 1))
    if truncated:
        # Push it over one border by 15-45 % of its extent: most of it stays visible,
        # so a cut diamond does not turn into a plain triangle.
        cut = rng.uniform(0.15, 0.45)
        side_ix = int(rng.integers(4))
        if side_ix == 0:
            x0 = -max(1, round(cut * mw))
        elif side_ix == 1:
            x0 = width - mw + max(1, round(cut * mw))
        elif side_ix == 2:
            y0 = -max(1, round(cut * mh))
        else:
            y0 = height - mh + max(1, round(cut * mh))
    return name, mask, x0, y0, truncated, small, low_contrast


def render_image(
    rng: np.random.Generator, width: int, height: int
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Render one image and its objects.

    Objects are dicts ``{"name", "box", "difficult", "truncated", "color"}`` with ``box``
    the tight 0-based continuous xyxy box of the visible pixels (floats) and ``color``
    the exact RGB the object was painted with.
    """
    canvas = _background(rng, width, height)
    labels = np.zeros((height, width), dtype=np.uint8)  # 0 = background, k = object k
    visible: list[int] = [0]  # pixel count per object id (index 0 unused)
    boxes: list[np.ndarray] = [np.zeros(4)]
    meta: list[dict[str, Any]] = []
    n_objects = 0 if rng.random() < _P_EMPTY_IMAGE else int(rng.integers(1, 6))

    for _ in range(n_objects):
        placed = _place_object(rng, width, height, labels, visible, boxes)
        if placed is None:
            continue  # no room left for another object without hiding one
        name, part, box, covered, truncated, difficult, low_contrast = placed
        ix0, iy0, ix1, iy1 = (int(v) for v in box)
        colour = _pick_colour(rng, canvas[iy0:iy1, ix0:ix1], [m["color_arr"] for m in meta], low_contrast)
        k = len(visible)
        canvas[iy0:iy1, ix0:ix1][part] = colour
        labels[iy0:iy1, ix0:ix1][part] = k
        for j in range(1, k):
            visible[j] -= int(covered[j])
        visible.append(int(part.sum()))
        boxes.append(box)
        meta.append({"name": name, "truncated": truncated, "difficult": difficult, "color_arr": colour})
    return Image.fromarray(canvas, mode="RGB"), _visible_objects(labels, boxes, meta)


def _place_object(rng: np.random.Generator, width: int, height: int, labels: np.ndarray, visible: list[int],
                  boxes: list[np.ndarray]):
    """A placement that overlaps no earlier object too much: ``(name, mask part, box, covered
    pixels per earlier object, truncated, difficult, low contrast)``, or None."""
    for _try in range(_PLACEMENT_TRIES):
        name, mask, x0, y0, truncated, small, low_contrast = _sample_placement(rng, width, height)
        # Clip the shape's canvas to the image.
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + mask.shape[1], width), min(y0 + mask.shape[0], height)
        part = mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        if int(part.sum()) == 0:
            continue
        box = np.array([ix0, iy0, ix1, iy1], dtype=np.float64)
        if any(_box_iou(box, other) > _MAX_IOU for other in boxes[1:]):
            continue
        covered = np.bincount(labels[iy0:iy1, ix0:ix1][part], minlength=len(visible))
        if any(covered[k] > _MAX_HIDDEN * visible[k] for k in range(1, len(visible))):
            continue
        return name, part, box, covered, truncated, small or low_contrast, low_contrast
    return None


def _visible_objects(labels: np.ndarray, boxes: list[np.ndarray], meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    objects = []
    for k, info in enumerate(meta, start=1):
        # Recompute from the label map: a later object may have covered an extremity.
        x0, y0, x1, y1 = (int(v) for v in boxes[k])  # visible pixels never leave the placed box
        ys, xs = np.nonzero(labels[y0:y1, x0:x1] == k)
        xs, ys = xs + x0, ys + y0
        objects.append(
            {
                "name": info["name"],
                "box": (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                "difficult": bool(info["difficult"]),
                "truncated": bool(info["truncated"]),
                "color": tuple(int(c) for c in info["color_arr"]),
            }
        )
    return objects


# --------------------------------------------------------------------------- VOC writing


def _annotation_xml(image_id: str, width: int, height: int, objects: list[dict[str, Any]]) -> bytes:
    parts = [
        "<annotation>\n",
        f"\t<folder>{YEAR_DIR}</folder>\n",
        f"\t<filename>{image_id}.jpg</filename>\n",
        "\t<source>\n\t\t<database>frcnn-jobs synthetic shapes</database>\n\t</source>\n",
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n",
        "\t<segmented>0</segmented>\n",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = (int(round(v)) for v in xyxy_to_voc(obj["box"]))
        parts.append(
            "\t<object>\n"
            f"\t\t<name>{obj['name']}</name>\n"
            "\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>{int(obj['truncated'])}</truncated>\n"
            f"\t\t<difficult>{int(obj['difficult'])}</difficult>\n"
            "\t\t<bndbox>\n"
            f"\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
            f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n"
            "\t\t</bndbox>\n"
            "\t</object>\n"
        )
    parts.append("</annotation>\n")
    return "".join(parts).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _split_ids(ids: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    n = len(ids)
    order = rng.permutation(n)
    n_train, n_val = round(_TRAIN_FRACTION * n), round(_VAL_FRACTION * n)
    def pick(idx) -> list[str]:
        return sorted(ids[i] for i in idx)

    train, val = pick(order[:n_train]), pick(order[n_train : n_train + n_val])
    return {"train": train, "val": val, "trainval": sorted(train + val), "test": pick(order[n_train + n_val :])}


def generate(
    out: str | os.PathLike[str],
    n_images: int = 600,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 400,
    sizes: Sequence[tuple[int, int]] | None = None,
    format: str = "voc",
) -> dict[str, Any]:
    """Write the dataset under ``out`` (local filesystem) and return a summary dict.

    ``format``: ``voc`` (``out/VOCdevkit/VOC2007``), ``coco`` (``out/annotations/
    instances_<split>.json`` and ``out/<split>/``) or ``yolo`` (``out/data.yaml``,
    ``out/images/<split>/``, ``out/labels/<split>/``); see ``pipelines.synth_layouts``. The
    images, their splits and their boxes are the same in every format.

    Image sides are uniform in ``min_size..max_size``, or, with ``sizes``, one of those
    ``(width, height)`` pairs drawn uniformly per image (repeat a pair to weight it; e.g.
    ``VOC_LIKE_SIZES``). Split lists are written last, so a reader never takes a half-written
    directory for a complete dataset.
    """
    _check_args(n_images, min_size, max_size, sizes)
    sizes = None if sizes is None else [(int(w), int(h)) for w, h in sizes]
    writer = _writer(format, Path(out))
    # Child i of the seed sequence depends only on (seed, i): image i is stable across n_images.
    split_seed, *image_seeds = np.random.SeedSequence(seed).spawn(n_images + 1)
    stats: Counter[str] = Counter()
    ids: list[str] = []
    for i, image_seed in enumerate(image_seeds):
        rng = np.random.default_rng(image_seed)
        if sizes is None:
            width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        else:
            width, height = sizes[int(rng.integers(len(sizes)))]
        image, objects = render_image(rng, width, height)
        image_id = f"{i:06d}"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        writer.add(image_id, buf.getvalue(), width, height, objects)
        ids.append(image_id)
        stats.update(o["name"] for o in objects)
        stats.update({"_images": 1, "_truncated": sum(o["truncated"] for o in objects),
                      "_difficult": sum(o["difficult"] for o in objects), "_empty": int(not objects)})
    splits = _split_ids(ids, np.random.default_rng(split_seed))
    writer.finish(splits)
    return _summary(out, writer.root, format, splits, stats)


def _writer(fmt: str, out: Path):
    layouts = {"coco": CocoWriter, "yolo": YoloWriter}
    if fmt == "voc":
        return VocWriter(out)
    if fmt not in layouts:
        raise ValueError(f"unknown format {fmt!r}; supported: voc, {', '.join(layouts)}")
    return layouts[fmt](out, SYNTH_CLASSES, SPLITS)


def _summary(out, root: Path, fmt: str, splits: dict[str, list[str]], stats: Counter[str]) -> dict[str, Any]:
    return {
        "root": str(out),
        "voc_dir": str(root),
        "format": fmt,
        "classes": SYNTH_CLASSES,
        "images": stats["_images"],
        "splits": {s: len(splits[s]) for s in SPLITS},
        "objects": sum(stats[c] for c in SYNTH_CLASSES),
        "objects_per_class": {c: stats[c] for c in SYNTH_CLASSES},
        "truncated": stats["_truncated"],
        "difficult": stats["_difficult"],
        "empty_images": stats["_empty"],
    }


def _check_args(n_images: int, min_size: int, max_size: int, sizes) -> None:
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    if sizes is not None and (not sizes or min(min(int(v) for v in p) for p in sizes) < 32):
        raise ValueError(f"sizes must be (width, height) pairs with sides >= 32, got {list(sizes)[:4]}")


class VocWriter:
    """``out/VOCdevkit/VOC2007``: JPEGImages/, Annotations/, ImageSets/Main/<split>.txt, classes.txt."""

    def __init__(self, out: Path) -> None:
        self.root = out / "VOCdevkit" / YEAR_DIR
        self.ann_dir, self.img_dir = self.root / "Annotations", self.root / "JPEGImages"
        self.set_dir = self.root / "ImageSets" / "Main"
        for d in (self.ann_dir, self.img_dir, self.set_dir):
            d.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            (self.set_dir / f"{split}.txt").unlink(missing_ok=True)
        (self.root / CLASSES_FILE).write_text("".join(f"{c}\n" for c in SYNTH_CLASSES), encoding="utf-8")

    def add(self, image_id: str, jpeg: bytes, width: int, height: int, objects: list[dict[str, Any]]) -> None:
        (self.img_dir / f"{image_id}.jpg").write_bytes(jpeg)
        (self.ann_dir / f"{image_id}.xml").write_bytes(_annotation_xml(image_id, width, height, objects))

    def finish(self, splits: dict[str, list[str]]) -> None:
        for split in SPLITS:
            _write_atomic(self.set_dir / f"{split}.txt", "".join(f"{x}\n" for x in splits[split]).encode())
