"""PASCAL VOC layout reader: year folders, split files, class lists (used by the Ray Data
precompute pipeline and by evaluation). Annotation XML and the box convention: ``pipelines.voc_xml``
(re-exported here).

Paths may be local (``/data/voc``, ``~/voc``) or URIs understood by
``pyarrow.fs.FileSystem.from_uri`` (``s3://``, ``gs://``, ``file://``...), through
``pipelines.storage``. Paths returned by this module keep the form they were given in (a URI
stays a URI), so they can be resolved again on any worker.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs

from frcnn.errors import DatasetError
from pipelines.storage import Location, read_bytes, resolve_filesystem
from pipelines.voc_xml import (
    Annotation,
    AnnotationError,
    Problem,
    parse_annotation,
    read_annotation,
    voc_to_xyxy,
    xyxy_to_voc,
)

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
    "parse_class_list",
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

_YEAR_DIR_RE = re.compile(r"^VOC(\d{4})$")


class VocLayoutError(DatasetError):
    """The directory tree does not look like a VOC dataset (message names path and gap)."""



@dataclass(frozen=True)
class VocItem:
    """One image of a split. ``image_path`` is None when no JPEG/PNG exists for it."""

    image_id: str
    year_dir: str
    annotation_path: str
    image_path: str | None



# --------------------------------------------------------------------------- layout


def _norm_year(year: str | int) -> str:
    text = str(year).strip()
    return text[3:] if text.upper().startswith("VOC") else text


def _looks_like_year_dir(loc: Location) -> bool:
    # Accept renamed year dirs (e.g. "voc_subset/") as long as they hold Annotations/.
    return bool(_YEAR_DIR_RE.match(loc.name)) or loc.child("Annotations").is_dir()


def _require_annotations(loc: Location) -> None:
    if not loc.child("Annotations").is_dir():
        raise VocLayoutError(f"{loc.shown}: missing Annotations/ directory")


def find_voc_dirs(data_root: str, years: Sequence[str] | None = None) -> list[str]:
    """Locate VOC year directories (``.../VOC2007``) under ``data_root``.

    ``data_root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself, or one
    ``VOC20XX`` directory. ``years`` (e.g. ``("2007", "2012")``) selects and orders the
    years to join; None takes every year found, sorted.
    """
    root = Location.of(data_root)
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


def _single_year_dir(loc: Location, wanted: list[str] | None) -> str:
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
        loc = Location.of(year_dir).child(CLASSES_FILE)
        if loc.is_file():
            per_dir[loc.shown] = parse_class_list(loc.read_bytes(), loc.shown)
    distinct = set(per_dir.values())
    if len(distinct) > 1:
        raise VocLayoutError(f"{voc_dir_or_root}: class lists disagree between {', '.join(per_dir)}")
    return distinct.pop() if distinct else VOC_CLASSES


def parse_class_list(data: bytes, source: str) -> tuple[str, ...]:
    """Class names, one per line (blank lines ignored); ``source`` names the file in errors."""
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
        loc = Location.of(year_dir)
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


def _read_split_ids(split_file: Location) -> list[str]:
    if not split_file.is_file():
        raise VocLayoutError(f"{split_file.shown}: split file not found")
    text = split_file.read_bytes().decode("utf-8")
    # First token only: per-class split files carry "<id> <1|-1|0>" lines.
    ids = (line.split()[0] for line in text.splitlines() if line.strip())
    return list(dict.fromkeys(ids))


def _image_index(image_dir: Location) -> dict[str, str]:
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


