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

from pipelines.datasets.base import (
    AnnotationError,
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
            raise ValueError("--dataset coco --annotations FILE needs --images DIR (the images' folder)")
        images = Location.of(source.images) if source.images else Location.of(source.root).child(split)
        return Location.of(source.annotations), images
    if not source.root:
        raise ValueError("--dataset coco needs --data-root (with annotations/instances_<split>.json) or "
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
        if img["id"] in seen:
            dupes.add(img["id"])
        seen.setdefault(img["id"], img)
    for image_id in dupes:
        problems.append(record(str(image_id), source, f"image id {image_id} appears more than once in the "
                                                      "file: all its entries left out"))
        del seen[image_id]
    return seen, dupes


def _group_objects(anns: list, images: dict, dupes: set, cats: dict, source: str,
                   problems: list) -> dict[Any, list]:
    """Image id -> its objects ``[bbox, class name or None, crowd, annotation id, category id]``
    (the bbox as the file has it: the worker checks it)."""
    grouped: dict[Any, list] = {}
    unknown = 0
    name_of = cats.get
    for k in range(len(anns)):
        a = anns[k]
        anns[k] = None  # drop each record (and its segmentation) once grouped
        try:
            image_id, cat = a.get("image_id"), a.get("category_id")
        except AttributeError:
            image_id = cat = None
        objects = grouped.get(image_id)
        if objects is None:
            if image_id in dupes:
                continue  # reported with its image
            if image_id not in images:
                unknown += 1
                if unknown <= 1000:
                    ann_id = a.get("id") if isinstance(a, dict) else "?"
                    problems.append(record(str(image_id), source,
                                           f"annotation id {ann_id}: unknown image id {image_id!r}, left out"))
                continue
            objects = grouped[image_id] = []
        objects.append([a.get("bbox"), name_of(cat), a.get("iscrowd", 0), a.get("id"), cat])
    if unknown > 1000:
        problems.append(record("", source, f"{unknown - 1000} more annotation(s) with an unknown image id"))
    return grouped


def ingest(doc: dict[str, Any], source: str, image_dir: Location, reader: CocoReader) -> CocoReader:
    """Fill ``reader`` from the instances document (which it empties as it goes, so the driver
    never holds the document and its grouped copy in full at once): classes, category ids, one
    item per good image carrying only that image's objects."""
    cats = _categories(doc["categories"], source)
    images, dupes = _images(doc["images"], source, reader.problems)
    grouped = _group_objects(doc.pop("annotations"), images, dupes, cats, source, reader.problems)
    reader.classes = tuple(cats.values())
    reader.category_ids = tuple(cats)
    items, ids = [], {}
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for image_id, img in images.items():
        key = str(image_id)
        ids[key] = image_id
        records = dumps([img["width"], img["height"], grouped.pop(image_id, ())])
        items.append(SplitItem(key, image_dir.child(*str(img["file_name"]).split("/")).shown, source, FORMAT, records))
    doc.clear()
    reader.original_ids, reader.split_items = ids, items
    return reader


def parse(item: dict, read: Read, class_names: Sequence[str], left_out: Collection[str] = (),
          dataset_classes: Sequence[str] = ()) -> tuple[Annotation, list[Problem]]:
    """The item's inline objects -> its annotation; problems name the image file."""
    source = item["image_path"]
    try:
        w, h, objs = json.loads(item["records"])
        width, height = int(w), int(h)
    except (ValueError, TypeError) as exc:
        raise AnnotationError(source, f"image {item['image_id']}: bad width/height ({exc})") from None
    objects, problems = [], []
    for bbox, name, crowd, ann_id, cat in objs:
        what = f"image {item['image_id']} annotation id {ann_id}"
        if name is None:
            problems.append(Problem(source, f"{what}: unknown category id {cat!r}, dropped"))
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                    for v in bbox)):
            problems.append(Problem(source, f"{what}: bbox {bbox!r} is not four numbers, dropped"))
        else:
            x, y, bw, bh = (float(v) for v in bbox)
            objects.append((x, y, x + bw, y + bh, name, bool(crowd), what))
    ann, more = build_annotation(item["image_id"], width, height, objects, source, class_names, left_out)
    return ann, problems + more
