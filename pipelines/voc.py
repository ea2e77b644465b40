"""PASCAL VOC layout reader (used by the Ray Data precompute pipeline and by evaluation).

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

Filesystems
-----------
Paths may be local (``/data/voc``, ``~/voc``) or URIs understood by
``pyarrow.fs.FileSystem.from_uri`` (``s3://``, ``gs://``, ``file://``...).  Paths
returned by this module keep the form they were given in (a URI stays a URI), so
they can be handed to :func:`resolve_filesystem` again on any worker.

Labels are ``1..C`` in class-name order; ``0`` is reserved for the background.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as DET
import numpy as np
import pyarrow.fs as pafs

__all__ = [
    "VOC_CLASSES",
    "Annotation",
    "AnnotationError",
    "Problem",
    "VocItem",
    "VocLayoutError",
    "find_voc_dirs",
    "list_split",
    "load_class_names",
    "parse_annotation",
    "read_annotation",
    "read_bytes",
    "resolve_filesystem",
    "voc_to_xyxy",
    "xyxy_to_voc",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")  # preference order

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_YEAR_DIR_RE = re.compile(r"^VOC(\d{4})$")


# --------------------------------------------------------------------------- errors


class VocLayoutError(ValueError):
    """The directory tree does not look like a VOC dataset (message names path and gap)."""


class AnnotationError(ValueError):
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


@dataclass(frozen=True)
class VocItem:
    """One image of a split. ``image_path`` is None when no JPEG/PNG exists for it."""

    image_id: str
    year_dir: str
    annotation_path: str
    image_path: str | None


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


# --------------------------------------------------------------------------- filesystems


def resolve_filesystem(path_or_uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path_on_that_filesystem)`` for a local path or a URI."""
    text = os.fspath(path_or_uri)
    if _URI_RE.match(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """Read a whole (small) file."""
    # compression=None: pyarrow would otherwise guess a codec from the extension.
    with fs.open_input_stream(path, compression=None) as stream:
        return stream.read()


@dataclass(frozen=True)
class _Loc:
    """A location as (filesystem, fs path) plus the user-facing string we hand back."""

    fs: pafs.FileSystem
    path: str
    shown: str

    @classmethod
    def of(cls, path_or_uri: str | os.PathLike[str]) -> _Loc:
        text = os.fspath(path_or_uri)
        fs, path = resolve_filesystem(text)
        if _URI_RE.match(text):
            shown = text.rstrip("/") if not text.endswith(":///") else text
        else:
            shown = path  # absolute, so workers with another cwd still find it
        return cls(fs, path.rstrip("/") or "/", shown)

    def child(self, *parts: str) -> _Loc:
        return _Loc(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.shown, *parts))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def is_dir(self) -> bool:
        return self.kind() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def list_names(self) -> list[tuple[str, pafs.FileType]]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return [(posixpath.basename(i.path.rstrip("/")), i.type) for i in infos]


# --------------------------------------------------------------------------- layout


def _norm_year(year: str | int) -> str:
    text = str(year).strip()
    return text[3:] if text.upper().startswith("VOC") else text


def _looks_like_year_dir(loc: _Loc) -> bool:
    # Accept renamed year dirs (e.g. "voc_subset/") as long as they hold Annotations/.
    return bool(_YEAR_DIR_RE.match(loc.name)) or loc.child("Annotations").is_dir()


def _require_annotations(loc: _Loc) -> None:
    if not loc.child("Annotations").is_dir():
        raise VocLayoutError(f"{loc.shown}: missing Annotations/ directory")


def find_voc_dirs(data_root: str, years: Sequence[str] | None = None) -> list[str]:
    """Locate VOC year directories (``.../VOC2007``) under ``data_root``.

    ``data_root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself, or one
    ``VOC20XX`` directory. ``years`` (e.g. ``("2007", "2012")``) selects and orders the
    years to join; None takes every year found, sorted.
    """
    root = _Loc.of(data_root)
    if not root.is_dir():
        raise VocLayoutError(f"{root.shown}: data root does not exist or is not a directory")
    if isinstance(years, str):  # "2007" would otherwise iterate as "2", "0", "0", "7"
        raise TypeError("years must be a sequence of years, e.g. ('2007',), not a string")
    wanted = None if years is None else [_norm_year(y) for y in years]

    devkit = root.child("VOCdevkit")
    if not devkit.is_dir():
        if _looks_like_year_dir(root):
            return [_single_year_dir(root, wanted)]
        devkit = root

    found = {
        m.group(1): devkit.child(name)
        for name, kind in devkit.list_names()
        if kind == pafs.FileType.Directory and (m := _YEAR_DIR_RE.match(name))
    }
    if not found:
        raise VocLayoutError(
            f"{root.shown}: no VOC year directory found "
            "(expected VOCdevkit/VOC20XX/, VOC20XX/ or Annotations/ under it)"
        )
    if wanted is None:
        chosen = [found[y] for y in sorted(found)]
    else:
        missing = [f"VOC{y}" for y in wanted if y not in found]
        if missing:
            raise VocLayoutError(
                f"{devkit.shown}: missing {', '.join(missing)} (found {', '.join(sorted('VOC' + y for y in found))})"
            )
        chosen = [found[y] for y in dict.fromkeys(wanted)]  # dedupe, keep order
    for loc in chosen:
        _require_annotations(loc)
    return [loc.shown for loc in chosen]


def _single_year_dir(loc: _Loc, wanted: list[str] | None) -> str:
    match = _YEAR_DIR_RE.match(loc.name)
    if wanted is not None and match and wanted != [match.group(1)]:
        raise VocLayoutError(
            f"{loc.shown}: is a single year directory (VOC{match.group(1)}) "
            f"but years {', '.join(wanted)} were requested"
        )
    _require_annotations(loc)
    return loc.shown


def _year_key(year_dir: str) -> str:
    name = posixpath.basename(year_dir.rstrip("/"))
    match = _YEAR_DIR_RE.match(name)
    return match.group(1) if match else name


def load_class_names(voc_dir_or_root: str) -> tuple[str, ...]:
    """Class names from ``classes.txt`` in the year dir(s) if present, else ``VOC_CLASSES``."""
    per_dir: dict[str, tuple[str, ...]] = {}
    for year_dir in find_voc_dirs(voc_dir_or_root):
        loc = _Loc.of(year_dir).child(CLASSES_FILE)
        if loc.is_file():
            per_dir[loc.shown] = _parse_class_file(read_bytes(loc.fs, loc.path), loc.shown)
    distinct = set(per_dir.values())
    if len(distinct) > 1:
        raise VocLayoutError(f"{voc_dir_or_root}: class lists disagree between {', '.join(per_dir)}")
    return distinct.pop() if distinct else VOC_CLASSES


def _parse_class_file(data: bytes, source: str) -> tuple[str, ...]:
    names = tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())
    if not names:
        raise VocLayoutError(f"{source}: class list is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise VocLayoutError(f"{source}: duplicate class names {dupes}")
    return names


def list_split(data_root: str, split: str, years: Sequence[str] | None = None) -> list[VocItem]:
    """Items of ``ImageSets/Main/<split>.txt`` across the selected years.

    Ids are ``"<YEAR>/<id>"`` when several years are joined (VOC2007 and VOC2012 reuse
    ids), else the bare id. Duplicate lines inside one split file are kept once.
    Annotation files are not stat'ed here (one request per item on an object store);
    :func:`read_annotation` reports a missing one as an :class:`AnnotationError`.
    """
    year_dirs = find_voc_dirs(data_root, years)
    prefix_year = len(year_dirs) > 1
    items: list[VocItem] = []
    for year_dir in year_dirs:
        loc = _Loc.of(year_dir)
        ids = _read_split_ids(loc.child("ImageSets", "Main", f"{split}.txt"))
        images = _image_index(loc.child("JPEGImages"))
        year = _year_key(year_dir)
        for raw_id in ids:
            items.append(
                VocItem(
                    image_id=f"{year}/{raw_id}" if prefix_year else raw_id,
                    year_dir=loc.shown,
                    annotation_path=loc.child("Annotations", f"{raw_id}.xml").shown,
                    image_path=images.get(raw_id),
                )
            )
    return items


def _read_split_ids(split_file: _Loc) -> list[str]:
    if not split_file.is_file():
        raise VocLayoutError(f"{split_file.shown}: split file not found")
    text = read_bytes(split_file.fs, split_file.path).decode("utf-8")
    # First token only: per-class split files carry "<id> <1|-1|0>" lines.
    ids = (line.split()[0] for line in text.splitlines() if line.strip())
    return list(dict.fromkeys(ids))


def _image_index(image_dir: _Loc) -> dict[str, str]:
    """Map image id -> image path, listing the directory once (no per-item stat on S3)."""
    if not image_dir.is_dir():
        return {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    best: dict[str, tuple[int, str]] = {}
    for name, kind in image_dir.list_names():
        stem, ext = posixpath.splitext(name)
        r = rank.get(ext.lower())
        if kind == pafs.FileType.File and r is not None and (stem not in best or r < best[stem][0]):
            best[stem] = (r, name)
    return {stem: image_dir.child(name).shown for stem, (_, name) in best.items()}


# --------------------------------------------------------------------------- parsing


def read_annotation(
    path: str, class_names: Sequence[str], image_id: str | None = None
) -> tuple[Annotation, list[Problem]]:
    """Read and parse one annotation file (local path or URI)."""
    fs, fs_path = resolve_filesystem(path)
    try:
        data = read_bytes(fs, fs_path)
    except (FileNotFoundError, OSError) as exc:
        raise AnnotationError(path, f"cannot read annotation file: {exc}") from exc
    return parse_annotation(data, path, class_names, image_id)


def parse_annotation(
    xml_bytes: bytes,
    source: str,
    class_names: Sequence[str],
    image_id: str | None = None,
) -> tuple[Annotation, list[Problem]]:
    """Parse one VOC XML annotation.

    File-level defects (unsafe or malformed XML, unusable ``<size>``) raise
    :class:`AnnotationError`. Object-level defects drop or clip the object and come
    back as :class:`Problem` records, so one bad box does not cost the whole image.
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
    for i, obj in enumerate(root.findall("object")):
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
