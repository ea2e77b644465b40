"""Ultralytics YOLO layout behind the dataset interface.

    frcnn-jobs precompute --dataset yolo --data-root data/yolo/data.yaml --split train --out pre/train

``data.yaml``: ``path`` (the dataset root; relative to the YAML's folder, default that folder),
``train``/``val``/``test`` (or any split name): an image folder under ``path`` (searched
recursively), a ``.txt`` file listing images, or a list of either; ``names``: a list or a
mapping ``{0: name, ...}`` (ids 0..C-1). Each image's labels are the ``.txt`` file at the same
place under ``labels/`` as the image under ``images/``: one ``class cx cy w h`` line per object,
normalised to [0, 1] by the image's width and height (as a viewer shows the image: EXIF
orientation applied). A line of more pairs (``class x1 y1 x2 y2 ...``, the segment format) gives
its polygon's bounding box. A missing label file means an image without objects (a negative).

Bad lines are reported with the label file and line number and left out: a column count that is
neither 5 nor an odd number >= 7, a value that is not a number, a coordinate outside [0, 1], a
class id outside ``names``.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Collection, Sequence

import pyarrow.fs as pafs

from frcnn.errors import DatasetError
from pipelines.datasets.base import (
    AnnotationError,
    DatasetSource,
    LayoutError,
    Read,
    Reader,
    SplitItem,
    build_annotation,
)
from pipelines.storage import Location
from pipelines.voc_xml import Annotation, Problem

FORMAT = "yolo"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class YoloReader(Reader):
    yaml_file: str = ""
    split_items: list[SplitItem]

    def items(self) -> list[SplitItem]:
        return self.split_items

    def describe(self) -> str:
        return self.yaml_file


def _names(value, source: str) -> tuple[str, ...]:
    if isinstance(value, list) and value:
        return tuple(str(n) for n in value)
    if isinstance(value, dict) and value:
        try:
            keys = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            keys = []
        if keys == list(range(len(value))):
            return tuple(str(value[k] if k in value else value[str(k)]) for k in keys)
    raise LayoutError(f"{source}: 'names' must be a non-empty list or a mapping of ids 0..C-1 to names")


def _yaml_location(root: str) -> Location:
    loc = Location.of(root)
    return loc if loc.name.endswith((".yaml", ".yml")) else loc.child("data.yaml")


def open(source: DatasetSource, split: str) -> YoloReader:
    import yaml

    if not source.root:
        raise DatasetError("--dataset yolo needs --data-root (data.yaml or the folder holding it)")
    yml = _yaml_location(source.root)
    try:
        doc = yaml.safe_load(yml.read_bytes())
    except FileNotFoundError:
        raise LayoutError(f"{yml.shown}: data.yaml not found") from None
    except yaml.YAMLError as exc:
        raise LayoutError(f"{yml.shown}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise LayoutError(f"{yml.shown}: not a YOLO data.yaml (not a mapping)")
    names = tuple(source.classes) if source.classes else _names(doc.get("names"), yml.shown)
    if doc.get(split) in (None, ""):
        keys = [k for k in doc if k not in ("path", "names", "nc", "download")]
        raise LayoutError(f"{yml.shown}: no split {split!r} (it has {', '.join(map(str, keys)) or 'none'})")
    base = yml.parent
    if doc.get("path"):
        p = str(doc["path"])
        parts = [x for x in p.split("/") if x not in ("", ".")]
        base = Location.of(p) if "://" in p or p.startswith("/") else yml.parent.child(*parts) if parts else base
    reader = YoloReader(source, names)
    reader.yaml_file = yml.shown
    reader.split_items = _list_images(base, doc[split], yml.shown)
    return reader


def _list_images(base: Location, entries, source: str) -> list[SplitItem]:
    items: list[SplitItem] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        text = str(entry)
        parts = [x for x in text.split("/") if x not in ("", ".")]
        loc = Location.of(text) if "://" in text or text.startswith("/") else base.child(*parts)
        if loc.is_dir():
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
            paths = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and posixpath.splitext(i.path)[1].lower() in IMAGE_EXTENSIONS)
            rel = [p[len(loc.path.rstrip("/")) + 1:] for p in paths]
            items += [_item(loc.child(*r.split("/")).shown, posixpath.splitext(r)[0]) for r in rel]
        elif loc.is_file():
            lines = [ln.strip() for ln in loc.read_bytes().decode("utf-8").splitlines() if ln.strip()]
            for ln in lines:
                img = Location.of(ln) if "://" in ln or ln.startswith("/") else base.child(*ln.lstrip("./").split("/"))
                items.append(_item(img.shown, posixpath.splitext(posixpath.basename(ln))[0]))
        else:
            raise LayoutError(f"{source}: split entry {entry!r}: {loc.shown} does not exist")
    ids = [i.image_id for i in items]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise LayoutError(f"{source}: image ids {dupes} appear more than once in the split")
    return items


def label_path(image_path: str) -> str:
    """``.../images/<rest>.jpg`` -> ``.../labels/<rest>.txt`` (the last ``images`` folder)."""
    head, _, tail = image_path.rpartition("/images/")
    stem = posixpath.splitext(tail)[0]
    return f"{head}/labels/{stem}.txt" if head else posixpath.splitext(image_path)[0] + ".txt"


def _item(image_path: str, image_id: str) -> SplitItem:
    return SplitItem(image_id, image_path, label_path(image_path), FORMAT)


def _image_size(data: bytes) -> tuple[int, int]:
    """Width, height as a viewer shows the image (EXIF orientation applied); header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in _ROTATED else (w, h)


def _line_object(parts: list[str], names: Sequence[str], width: int, height: int, what: str):
    """One label line -> ``(x1, y1, x2, y2, name, crowd, what)``, or a reason string."""
    n = len(parts)
    if not (n == 5 or (n >= 7 and n % 2 == 1)):
        return f"{n} columns (need 5: class cx cy w h, or an odd number >= 7 for a polygon)"
    try:
        cls_f = float(parts[0])
        values = [float(v) for v in parts[1:]]
    except ValueError:
        return "a value is not a number"
    if cls_f != int(cls_f) or not 0 <= int(cls_f) < len(names):
        return f"class id {parts[0]} outside names (0..{len(names) - 1})"
    if not all(0.0 <= v <= 1.0 for v in values):
        return "coordinate outside [0, 1]"
    if n == 5:
        cx, cy, w, h = values
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    else:
        xs, ys = values[0::2], values[1::2]
        box = (min(xs), min(ys), max(xs), max(ys))
    x1, y1, x2, y2 = (round(v * s, 4) for v, s in zip(box, (width, height, width, height)))
    return (x1, y1, x2, y2, names[int(cls_f)], False, what)


def parse(item: dict, read: Read, class_names: Sequence[str],
          left_out: Collection[str] = (), dataset_classes: Sequence[str] = ()) -> tuple[Annotation, list[Problem]]:
    """The image's label file -> its annotation (reads the image header for its size)."""
    labels = item["annotation_path"]
    try:
        text = read(labels).decode("utf-8")
    except FileNotFoundError:
        text = ""
    except UnicodeDecodeError as exc:
        raise AnnotationError(labels, f"label file is not text ({exc})") from None
    try:
        data = read(item["image_path"])
    except FileNotFoundError:
        raise AnnotationError(item["image_path"], "image file not found") from None
    try:
        width, height = _image_size(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
        raise AnnotationError(item["image_path"], f"image does not decode: {type(exc).__name__}: {exc}") from None
    names = tuple(dataset_classes) or tuple(class_names)
    objects, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        what = f"{labels}:{lineno}"
        obj = _line_object(line.split(), names, width, height, f"line {lineno}")
        if isinstance(obj, str):
            problems.append(Problem(what, f"{obj}, line left out"))
        else:
            objects.append(obj)
    ann, more = build_annotation(item["image_id"], width, height, objects, labels, class_names, left_out)
    return ann, problems + more
