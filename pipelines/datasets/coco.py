"""COCO instances JSON behind the dataset interface.

    frcnn-jobs precompute --dataset coco --data-root data/coco --split train2017 --out pre/train
    frcnn-jobs precompute --dataset coco --annotations ann.json --images imgs/ --split train --out pre/train

A root holds ``annotations/instances_<split>.json`` and ``<split>/`` (the images); or name the
JSON (``annotations``) and the image folder (``images``). Local paths and object-store URIs.

The driver reads the JSON once and groups the objects by image: each split item carries only its
own image's objects (``SplitItem.records``), so no task receives the whole file.

- Categories: sorted by id, mapped onto labels ``1..C`` in that order; ``category_ids`` keeps
  each class's COCO id (the manifest and the model keep it, so detections go back out with it).
- ``bbox`` is ``[x, y, w, h]`` in 0-based continuous pixels: ``xyxy = [x, y, x + w, y + h]``.
- Crowd objects (``iscrowd: 1``) are kept with the ``difficult`` flag: never anchor targets,
  and left to COCOeval's crowd rule in evaluation.
- Images without objects are negatives.
- Bad records, each reported with the image id and the file: a duplicated image id (every entry
  with it is left out), an object whose ``image_id`` is unknown, an object of an unknown category,
  an object whose box has zero area or leaves the image (dropped, or clipped when part of it is
  inside), an image entry without ``id``/``file_name``/``width``/``height``; a missing or
  unreadable image file is skipped by precompute like any other.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from frcnn.errors import DatasetError
from pipelines.datasets.base import (
    DatasetSource,
    LayoutError,
    Read,
    Reader,
    SplitItem,
    build_annotation,
    record,
)
from pipelines.storage import Location
from pipelines.voc_xml import Annotation, Problem

FORMAT = "coco"


class CocoReader(Reader):
    """One split of a COCO dataset, ingested: ``annotation_file`` (shown form), ``image_dir``,
    ``original_ids`` (item image id -> the JSON's image id), ``split_items``."""

    annotation_file: str = ""
    original_ids: dict[str, Any]
    split_items: list[SplitItem]

    def items(self) -> list[SplitItem]:
        return self.split_items

    def describe(self) -> str:
        return self.annotation_file


def split_paths(source: DatasetSource, split: str) -> tuple[Location, Location]:
    """``(instances JSON, image folder)`` of a split."""
    if source.annotations:
        if not source.images and not source.root:
            raise DatasetError("--dataset coco --annotations FILE needs --images DIR (the images' folder)")
        images = Location.of(source.images) if source.images else Location.of(source.root).child(split)
        return Location.of(source.annotations), images
    if not source.root:
        raise DatasetError("--dataset coco needs --data-root (with annotations/instances_<split>.json) or "
                           "--annotations FILE --images DIR")
    root = Location.of(source.root)
    images = Location.of(source.images) if source.images else root.child(split)
    return root.child("annotations", f"instances_{split}.json"), images


def open(source: DatasetSource, split: str) -> CocoReader:
    ann, images = split_paths(source, split)
    try:
        doc = read_json(ann)
    except FileNotFoundError:
        raise LayoutError(f"{ann.shown}: COCO annotation file not found") from None
    reader = CocoReader(source)
    reader.annotation_file = ann.shown
    return ingest(doc, ann.shown, images, reader)


def read_json(loc: Location) -> dict[str, Any]:
    """The instances document at ``loc`` (streamed: the file's bytes are not held beside the parsed
    document), or ``LayoutError`` when the file is not COCO."""
    try:
        with loc.fs.open_input_stream(loc.path) as raw:
            doc = json.load(io.TextIOWrapper(raw, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{loc.shown}: not a JSON file ({exc})") from None
    return check_document(doc, loc.shown)


def load_json(data: bytes, source: str) -> dict[str, Any]:
    """The instances document in ``data``, or ``LayoutError`` when it is not COCO."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise LayoutError(f"{source}: not a JSON file ({exc})") from None
    return check_document(doc, source)


def check_document(doc: Any, source: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in
                                            ("images", "annotations", "categories")):
        raise LayoutError(f"{source}: not a COCO instances file (needs the lists 'images', 'annotations' "
                          "and 'categories')")
    return doc


def _categories(cats: list, source: str) -> dict[Any, str]:
    try:
        by_id = {c["id"]: str(c["name"]) for c in cats}
    except (KeyError, TypeError) as exc:
        raise LayoutError(f"{source}: a category without 'id' or 'name' ({exc})") from None
    if len(by_id) != len(cats):
        raise LayoutError(f"{source}: duplicate category ids")
    names = list(by_id.values())
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LayoutError(f"{source}: duplicate category names {dupes}")
    if not by_id:
        raise LayoutError(f"{source}: no categories")
    return dict(sorted(by_id.items(), key=lambda kv: kv[0]))


def _images(entries: list, source: str, problems: list) -> tuple[dict[Any, dict], set]:
    """``(image id -> entry, duplicated ids)``; duplicated ids and entries missing fields are
    reported and left out (with their objects)."""
    seen: dict[Any, dict] = {}
    dupes: set = set()
    for img in entries:
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
            shown = img.get("id", "?") if isinstance(img, dict) else "?"
            problems.append(record(str(shown), source, "image entry without id, file_name, width or height"))
            continue
        w, h = img["width"], img["height"]
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            problems.append(record(str(img["id"]), source, f"image {img['id']}: width/height {w!r}x{h!r} are not "
                                                           "positive integers, left out"))
            continue
        if img["id"] in seen:
            dupes.add(img["id"])
        seen.setdefault(img["id"], img)
    for image_id in dupes:
        problems.append(record(str(image_id), source, f"image id {image_id} appears more than once in the "
                                                      "file: all its entries left out"))
        del seen[image_id]
    return seen, dupes


# One image's objects travel as bytes: a header (width, height) and one record per object.
HEADER = np.dtype([("width", "<i8"), ("height", "<i8")])
OBJECT = np.dtype([("x", "<f8"), ("y", "<f8"), ("w", "<f8"), ("h", "<f8"), ("cls", "<i4"), ("crowd", "u1"),
                   ("ann", "<i8"), ("cat", "<i8")])


def _int_or(value: Any, default: int = -1) -> int:
    return value if isinstance(value, int) else default


def _columns(anns: list, index: dict, dupes: set, cls_of: dict, source: str,
             problems: list) -> tuple[np.ndarray, np.ndarray]:
    """The objects as one record array (``img`` = the image's position, -1 when left out), read
    record by record; each record (and its segmentation) is dropped once read."""
    n = len(anns)
    img = np.full(n, -1, np.int64)
    boxes: list = [None] * n
    cls, crowd, ann, cat = (np.full(n, -1, np.int32), np.zeros(n, np.uint8), np.full(n, -1, np.int64),
                            np.full(n, -1, np.int64))
    unknown = 0
    for k in range(n):
        a = anns[k]
        anns[k] = None
        try:
            image_id, c = a.get("image_id"), a.get("category_id")
        except AttributeError:
            image_id = c = None
        i = index.get(image_id)
        if i is None:
            if image_id not in dupes:  # a duplicated image's objects are reported with the image
                unknown += 1
                if unknown <= 1000:
                    ann_id = a.get("id") if isinstance(a, dict) else "?"
                    problems.append(record(str(image_id), source,
                                           f"annotation id {ann_id}: unknown image id {image_id!r}, left out"))
            continue
        img[k], boxes[k], cls[k], crowd[k] = i, a.get("bbox"), cls_of.get(c, -1), bool(a.get("iscrowd", 0))
        ann[k], cat[k] = _int_or(a.get("id")), _int_or(c)
    if unknown > 1000:
        problems.append(record("", source, f"{unknown - 1000} more annotation(s) with an unknown image id"))
    out = np.zeros(n, OBJECT)
    out["x"], out["y"], out["w"], out["h"] = _boxes(boxes).T
    out["cls"], out["crowd"], out["ann"], out["cat"] = cls, crowd, ann, cat
    return img, out


def _boxes(boxes: list) -> np.ndarray:
    """``(N, 4)`` float64; a bbox that is not four finite numbers (or a left-out record) is NaN."""
    try:
        return np.array([b if b is not None else (np.nan,) * 4 for b in boxes], np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        return np.array([b if _is_box(b) else (np.nan,) * 4 for b in boxes], np.float64).reshape(-1, 4)


def _is_box(b: Any) -> bool:
    return isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)


def ingest(doc: dict[str, Any], source: str, image_dir: Location, reader: CocoReader) -> CocoReader:
    """Fill ``reader`` from the instances document (which it empties as it goes, so the driver
    never holds the document and its grouped copy in full at once): classes, category ids, one
    item per good image carrying only that image's objects."""
    cats = _categories(doc["categories"], source)
    images, dupes = _images(doc["images"], source, reader.problems)
    index = {image_id: i for i, image_id in enumerate(images)}
    img, objects = _columns(doc.pop("annotations"), index, dupes, {c: k for k, c in enumerate(cats)}, source,
                            reader.problems)
    order = np.argsort(img, kind="stable")
    img, objects = img[order], objects[order]
    ends = np.searchsorted(img, np.arange(len(images)), side="right")
    starts = np.searchsorted(img, np.arange(len(images)), side="left")
    header = np.zeros(1, HEADER)
    items, ids = [], {}
    for i, (image_id, entry) in enumerate(images.items()):
        key = str(image_id)
        ids[key] = image_id
        header["width"], header["height"] = entry["width"], entry["height"]
        records = header.tobytes() + objects[starts[i]:ends[i]].tobytes()
        items.append(SplitItem(key, image_dir.child(*str(entry["file_name"]).split("/")).shown, source, FORMAT,
                               records))
    doc.clear()
    reader.classes, reader.category_ids = tuple(cats.values()), tuple(cats)
    reader.original_ids, reader.split_items = ids, items
    return reader


def parse(item: dict, read: Read, class_names: Sequence[str], left_out: Collection[str] = (),
          dataset_classes: Sequence[str] = ()) -> tuple[Annotation, list[Problem]]:
    """The item's inline objects -> its annotation; problems name the image file.
    ``dataset_classes``: the reader's classes (a record's ``cls`` indexes them)."""
    source, image_id = item["image_path"], item["image_id"]
    rec = bytes(item["records"])
    head = np.frombuffer(rec[:HEADER.itemsize], HEADER)[0]
    objects, problems = [], []
    for o in np.frombuffer(rec[HEADER.itemsize:], OBJECT):
        what = f"image {image_id} annotation id {o['ann']}"
        x, y, w, h = (float(o[k]) for k in ("x", "y", "w", "h"))
        if o["cls"] < 0:
            problems.append(Problem(source, f"{what}: unknown category id {o['cat']}, dropped"))
        elif not all(math.isfinite(v) for v in (x, y, w, h)):
            problems.append(Problem(source, f"{what}: bbox is not four numbers, dropped"))
        else:
            objects.append((x, y, x + w, y + h, dataset_classes[int(o["cls"])], bool(o["crowd"]), what))
    ann, more = build_annotation(image_id, int(head["width"]), int(head["height"]), objects, source, class_names,
                                 left_out)
    return ann, problems + more
