"""What every dataset format gives the pipelines: split items and per-image annotations.

A format is one module of ``pipelines.datasets`` with

- a reader class (``open(source) -> reader``): ``classes`` (the dataset's class names, label
  order), ``category_ids`` (the dataset's own id of each class, when it has ids), ``items(split)``
  (one :class:`SplitItem` per image, listed in the driver) and ``describe(split)`` (what the split
  was read from, for the manifest and MLflow);
- ``parse(item, read, class_names, left_out)`` run on a worker for one image: its
  :class:`~pipelines.voc_xml.Annotation` in the model's classes (0-based xyxy pixels) and the
  per-object :class:`~pipelines.voc_xml.Problem` list; :class:`AnnotationError` when the image
  cannot be used at all.

Every format yields the same annotation, so the precompute rows, the shards and what ``train``
reads are the same whatever layout the data came in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from frcnn.errors import DatasetError
from pipelines.voc_xml import Annotation, AnnotationError, Problem

__all__ = ["Annotation", "AnnotationError", "DatasetSource", "LayoutError", "Problem", "Reader", "SplitItem",
           "build_annotation", "items_digest", "record"]

Read = Callable[[str], bytes]


class LayoutError(DatasetError):
    """The dataset cannot be read at all (the message names the file or folder and the gap)."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset is: ``format`` (voc, coco, yolo) and its location.

    ``root``: the VOC data root, the COCO root (``annotations/instances_<split>.json`` and
    ``<split>/``) or the YOLO ``data.yaml`` (or the folder holding it). COCO also takes
    ``annotations`` (one instances JSON) and ``images`` (its image folder) instead of a root.
    ``years``: VOC years to join. ``classes``: the dataset's class names, when its own list is
    not to be used (VOC: ``classes.txt``, else VOC's 20).
    """

    format: str = "voc"
    root: str | None = None
    annotations: str | None = None
    images: str | None = None
    years: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None

    @property
    def shown(self) -> str:
        from pipelines.storage import shown

        return shown(self.root or self.annotations or self.images or "")


@dataclass(frozen=True)
class SplitItem:
    """One image of a split, as the driver lists it and a worker reads it.

    ``annotation_path``: the file holding this image's annotation (VOC XML, YOLO label file, the
    COCO JSON). ``records``: an inline annotation (COCO: this image's objects only, as packed records), so a
    task never receives more than its own images' records. ``image_path`` is None when no image
    file exists for the entry.
    """

    image_id: str
    image_path: str | None
    annotation_path: str
    format: str = "voc"
    records: bytes = b""
    year_dir: str = ""


@dataclass
class Reader:
    """Common reader state: ``classes`` (label order), ``category_ids`` (the dataset's id of each
    class, COCO only), ``problems`` found while listing (records for the manifest)."""

    source: DatasetSource
    classes: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()
    problems: list[dict[str, str]] = field(default_factory=list)


def record(image_id: str, source: str, reason: str) -> dict[str, str]:
    return {"image_id": image_id, "source": source, "reason": reason}


def items_digest(items: Sequence[SplitItem]) -> str:
    """A content hash of a split listing (ids, files, inline records): the evaluation's dataset digest."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.image_id, item.image_path, item.annotation_path]).encode())
        h.update(item.records)
    return h.hexdigest()[:32]


def build_annotation(image_id: str, width: int, height: int, objects: Sequence[tuple], source: str,
                     class_names: Sequence[str], left_out: Sequence[str] = ()) -> tuple[Annotation, list[Problem]]:
    """Objects ``(x1, y1, x2, y2, class name, crowd, what)`` in 0-based pixels -> an Annotation.

    A box of zero or negative area is dropped, one that leaves the image is clipped (dropped when
    nothing is left); an unknown class is dropped, a class in ``left_out`` (the dataset's, not the
    model's) is counted. Crowd objects are kept with ``difficult`` set: never anchor targets.
    """
    label_of = {n: i + 1 for i, n in enumerate(class_names)}
    boxes, labels, crowd, problems, skipped = [], [], [], [], {}
    for x1, y1, x2, y2, name, is_crowd, what in objects:
        if name not in label_of:
            if name in left_out:
                skipped[name] = skipped.get(name, 0) + 1
            else:
                problems.append(Problem(source, f"{what}: unknown class {name!r}, dropped"))
            continue
        if not (x2 > x1 and y2 > y1):
            problems.append(Problem(source, f"{what}: zero-area box ({x1:g}, {y1:g}, {x2:g}, {y2:g}), dropped"))
            continue
        c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
        if c != (x1, y1, x2, y2):
            where = f"{what}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) extends past the {width}x{height} image"
            if not (c[2] > c[0] and c[3] > c[1]):
                problems.append(Problem(source, f"{where} and lies entirely outside it, dropped"))
                continue
            problems.append(Problem(source, f"{where}, clipped"))
        boxes.append(c)
        labels.append(label_of[name])
        crowd.append(bool(is_crowd))
    n = len(labels)
    return Annotation(image_id=image_id, width=int(width), height=int(height),
                      boxes=np.asarray(boxes, np.float32).reshape(n, 4), labels=np.asarray(labels, np.int64),
                      difficult=np.asarray(crowd, bool).reshape(n), truncated=np.zeros(n, bool),
                      left_out=skipped), problems
