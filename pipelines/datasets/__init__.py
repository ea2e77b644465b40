"""Dataset formats, one module each behind one interface (``pipelines.datasets.base``).

    reader = open_split(DatasetSource("coco", root="data/coco"), "val2017")
    reader.classes, reader.items()          # in the driver: class names, one SplitItem per image
    parse_item(item_dict, read, names)      # on a worker: (Annotation, problems) of one image

Adding a format is adding a module with ``open(source, split)`` and ``parse(...)`` and naming it
in ``FORMATS``.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Sequence

from pipelines.datasets.base import (
    AnnotationError,
    DatasetSource,
    LayoutError,
    Read,
    Reader,
    SplitItem,
    items_digest,
    record,
)

__all__ = ["FORMATS", "AnnotationError", "DatasetSource", "LayoutError", "Reader", "SplitItem", "items_digest",
           "open_split", "parse_item", "record"]

FORMATS = ("voc", "coco", "yolo")


def _module(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; supported: {', '.join(FORMATS)}")
    return importlib.import_module(f"pipelines.datasets.{fmt}")


def open_split(source: DatasetSource, split: str) -> Reader:
    """The reader of one split: ``classes``, ``category_ids``, ``items()``, ``describe()``,
    ``problems`` (records found while listing: COCO's duplicate ids, unknown image ids...)."""
    return _module(source.format).open(source, split)


def parse_item(item: dict, read: Read, class_names: Sequence[str], left_out: Collection[str] = (),
               dataset_classes: Sequence[str] = ()):
    """One image's annotation in the model's classes (runs on a worker; see the format's ``parse``)."""
    return _module(item.get("format") or "voc").parse(item, read, class_names, left_out, dataset_classes)
