"""PASCAL VOC annotation XML: parsing (defusedxml) and the one coordinate conversion.

Coordinate convention
---------------------
VOC XML stores 1-based, *inclusive* pixel boxes: an object covering pixel columns
1..10 has ``xmin=1, xmax=10`` (10 pixels wide).  Everything inside frcnn-jobs uses
0-based *continuous* ``[x1, y1, x2, y2]`` float32 boxes, where pixel ``i`` spans
``[i, i+1)``.  The conversion happens exactly once, here::

    x1 = xmin - 1    y1 = ymin - 1    x2 = xmax    y2 = ymax

so the width is ``x2 - x1 = xmax - xmin + 1`` and a box covering the whole image is
``[0, 0, W, H]``.  :func:`voc_to_xyxy` applies it, :func:`xyxy_to_voc` inverts it
(for the evaluator and the synthetic generator).  A VOC box with ``xmin == xmax`` is
therefore one pixel wide, not degenerate; ``xmax == xmin - 1`` is zero-area.

Labels are ``1..C`` in class-name order; ``0`` is reserved for the background.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as DET
import numpy as np

from frcnn.errors import DatasetError
from pipelines.storage import Location

__all__ = [
    "Annotation",
    "AnnotationError",
    "Problem",
    "parse_annotation",
    "read_annotation",
    "voc_to_xyxy",
    "xyxy_to_voc",
]


# --------------------------------------------------------------------------- errors


class AnnotationError(DatasetError):
    """An annotation file that cannot be used at all (as opposed to a per-object Problem)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # keep picklable across Ray workers despite the custom __init__
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True)
class Problem:
    """A non-fatal defect in an annotation file: the object was dropped or fixed."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# --------------------------------------------------------------------------- records


# eq=False: the generated __eq__ would compare numpy arrays and raise on truthiness.
@dataclass(frozen=True, eq=False)
class Annotation:
    """Parsed annotation; boxes are 0-based continuous xyxy float32 (see module docstring)."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32
    labels: np.ndarray  # (N,) int64 in 1..C
    difficult: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    left_out: dict[str, int] = field(default_factory=dict)  # objects of classes not asked for, per class

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- coordinates


def voc_to_xyxy(arr: np.ndarray | Sequence[float]) -> np.ndarray:
    """VOC 1-based inclusive ``(xmin, ymin, xmax, ymax)`` -> 0-based continuous xyxy float32."""
    out = np.array(arr, dtype=np.float32)  # copy: never mutate the caller's array
    if out.shape[-1:] != (4,):
        raise ValueError(f"expected boxes shaped (..., 4), got {out.shape}")
    out[..., 0:2] -= 1.0
    return out


def xyxy_to_voc(arr: np.ndarray | Sequence[float]) -> np.ndarray:
    """Inverse of :func:`voc_to_xyxy`. Returns float64 so callers can round to ints exactly."""
    out = np.array(arr, dtype=np.float64)
    if out.shape[-1:] != (4,):
        raise ValueError(f"expected boxes shaped (..., 4), got {out.shape}")
    out[..., 0:2] += 1.0
    return out


# --------------------------------------------------------------------------- parsing


def read_annotation(
    path: str, class_names: Sequence[str], image_id: str | None = None
) -> tuple[Annotation, list[Problem]]:
    """Read and parse one annotation file (local path or URI)."""
    try:
        data = Location.of(path).read_bytes()
    except (FileNotFoundError, OSError) as exc:
        raise AnnotationError(path, f"cannot read annotation file: {exc}") from exc
    return parse_annotation(data, path, class_names, image_id)


def parse_annotation(
    xml_bytes: bytes,
    source: str,
    class_names: Sequence[str],
    image_id: str | None = None,
    left_out: Collection[str] = (),
) -> tuple[Annotation, list[Problem]]:
    """Parse one VOC XML annotation.

    File-level defects (unsafe or malformed XML, unusable ``<size>``) raise
    :class:`AnnotationError`. Object-level defects drop or clip the object and come
    back as :class:`Problem` records, so one bad box does not cost the whole image.
    Objects of a class in ``left_out`` (a dataset class the model does not have) are not
    problems: they are left out and counted per class in ``Annotation.left_out``.
    """
    root = _parse_xml(xml_bytes, source)
    width, height = _parse_size(root, source)
    label_of = {name: i + 1 for i, name in enumerate(class_names)}
    if image_id is None:
        image_id = posixpath.splitext(posixpath.basename(source.rstrip("/")))[0]

    issues: list[tuple[int, str]] = []  # (object index, reason); sorted at the end
    raw: list[tuple[float, float, float, float]] = []
    index: list[int] = []
    labels: list[int] = []
    flags: list[tuple[bool, bool]] = []
    skipped: dict[str, int] = {}
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name in left_out and name not in label_of:
            skipped[name] = skipped.get(name, 0) + 1
            continue
        parsed = _parse_object(obj, i, label_of, issues)
        if parsed is not None:
            coords, label, difficult, truncated = parsed
            raw.append(coords)
            index.append(i)
            labels.append(label)
            flags.append((difficult, truncated))

    boxes = voc_to_xyxy(np.asarray(raw, dtype=np.float32).reshape(-1, 4))
    keep = _check_boxes(boxes, np.asarray(index, dtype=np.int64), width, height, issues)
    flag_arr = np.asarray(flags, dtype=bool).reshape(-1, 2)
    annotation = Annotation(
        image_id=image_id,
        width=width,
        height=height,
        boxes=np.ascontiguousarray(boxes[keep]),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
        difficult=np.ascontiguousarray(flag_arr[keep, 0]),
        truncated=np.ascontiguousarray(flag_arr[keep, 1]),
        left_out=skipped,
    )
    problems = [Problem(source, reason) for _, reason in sorted(issues, key=lambda t: t[0])]
    return annotation, problems


def _parse_xml(xml_bytes: bytes, source: str) -> Element:
    try:
        root = DET.fromstring(xml_bytes)
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(source, f"forbidden XML entity/DTD ({type(exc).__name__}): {exc}") from exc
    except ParseError as exc:
        raise AnnotationError(source, f"XML does not parse: {exc}") from exc
    if root.tag != "annotation":
        raise AnnotationError(source, f"root element is <{root.tag}>, expected <annotation>")
    return root


def _parse_size(root: Element, source: str) -> tuple[int, int]:
    size = root.find("size")
    if size is None:
        raise AnnotationError(source, "missing <size>")
    dims = []
    for tag in ("width", "height"):
        value = _number(size.findtext(tag))
        if value is None or value <= 0 or not value.is_integer():
            raise AnnotationError(source, f"invalid <size>/<{tag}> {size.findtext(tag)!r}: need a positive integer")
        dims.append(int(value))
    return dims[0], dims[1]


def _number(text: str | None) -> float | None:
    """Finite float from element text, or None."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _flag(obj: Element, tag: str, what: str, issues: list[tuple[int, str]], i: int) -> bool:
    text = obj.findtext(tag)
    if text is None or not text.strip():
        return False
    word = text.strip().lower()
    if word in ("true", "yes"):
        return True
    if word in ("false", "no"):
        return False
    value = _number(word)
    if value is None:
        issues.append((i, f"{what}: non-numeric <{tag}> {text!r}, assuming 0"))
        return False
    return value != 0


def _parse_object(
    obj: Element, i: int, label_of: dict[str, int], issues: list[tuple[int, str]]
) -> tuple[tuple[float, float, float, float], int, bool, bool] | None:
    name = (obj.findtext("name") or "").strip()
    what = f"object #{i} ({name or '?'})"
    if not name:
        issues.append((i, f"{what}: missing <name>, dropped"))
        return None
    label = label_of.get(name)
    if label is None:
        issues.append((i, f"{what}: unknown class {name!r}, dropped"))
        return None
    bndbox = obj.find("bndbox")
    if bndbox is None:
        issues.append((i, f"{what}: missing <bndbox>, dropped"))
        return None
    coords = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        value = _number(bndbox.findtext(tag))
        if value is None:
            issues.append((i, f"{what}: non-numeric or missing <{tag}> {bndbox.findtext(tag)!r}, dropped"))
            return None
        coords.append(value)
    difficult = _flag(obj, "difficult", what, issues, i)
    truncated = _flag(obj, "truncated", what, issues, i)
    return (coords[0], coords[1], coords[2], coords[3]), label, difficult, truncated


def _check_boxes(
    boxes: np.ndarray, index: np.ndarray, width: int, height: int, issues: list[tuple[int, str]]
) -> np.ndarray:
    """Drop degenerate boxes, clip boxes that leave the image (in place). Returns keep mask."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    inverted = (w < 0) | (h < 0)
    zero = ~inverted & ((w == 0) | (h == 0))
    for j in np.flatnonzero(inverted):
        issues.append((int(index[j]), f"object #{index[j]}: inverted box {_voc_str(boxes[j])}, dropped"))
    for j in np.flatnonzero(zero):
        issues.append((int(index[j]), f"object #{index[j]}: zero-area box {_voc_str(boxes[j])}, dropped"))
    keep = ~(inverted | zero)

    limits = np.array([width, height, width, height], dtype=np.float32)
    clipped = np.clip(boxes, 0.0, limits)
    moved = keep & np.any(clipped != boxes, axis=1)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    for j in np.flatnonzero(moved):
        where = f"object #{index[j]}: box {_voc_str(boxes[j])} extends past the {width}x{height} image"
        if empty[j]:
            issues.append((int(index[j]), f"{where} and lies entirely outside it, dropped"))
        else:
            issues.append((int(index[j]), f"{where}, clipped to {_voc_str(clipped[j])}"))
    boxes[:] = clipped
    return keep & ~empty


def _voc_str(xyxy: np.ndarray) -> str:
    """Show a box in the file's own (VOC) coordinates, so a human can grep for it."""
    xmin, ymin, xmax, ymax = (f"{v:g}" for v in xyxy_to_voc(xyxy))
    return f"(xmin={xmin}, ymin={ymin}, xmax={xmax}, ymax={ymax})"
