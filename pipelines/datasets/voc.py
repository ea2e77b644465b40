"""PASCAL VOC behind the dataset interface: ``pipelines.voc`` lists the split (year folders,
``ImageSets/Main/<split>.txt``), ``pipelines.voc_xml`` parses each annotation with defusedxml."""

from __future__ import annotations

import posixpath
from collections.abc import Collection, Sequence

from frcnn.errors import DatasetError
from pipelines.datasets.base import AnnotationError, DatasetSource, Read, Reader, SplitItem
from pipelines.voc_xml import Annotation, Problem, parse_annotation

FORMAT = "voc"


class VocReader(Reader):
    split: str = ""

    def items(self) -> list[SplitItem]:
        from pipelines.voc import list_split

        return [SplitItem(i.image_id, i.image_path, i.annotation_path, FORMAT, year_dir=i.year_dir)
                for i in list_split(self.source.root, self.split, self.source.years)]

    def describe(self) -> str:
        return self.source.shown


def open(source: DatasetSource, split: str) -> VocReader:
    from pipelines.voc import load_class_names

    if not source.root:
        raise DatasetError("--dataset voc needs --data-root")
    classes = tuple(source.classes) if source.classes else tuple(load_class_names(source.root))
    reader = VocReader(source, classes)
    reader.split = split
    return reader


def parse(item: dict, read: Read, class_names: Sequence[str],
          left_out: Collection[str] = (), dataset_classes: Sequence[str] = ()) -> tuple[Annotation, list[Problem]]:
    """Read and parse the item's XML (``FileNotFoundError`` and a missing image become
    :class:`AnnotationError`; other ``OSError`` from the store propagate)."""
    ann_path, img_path = item["annotation_path"], item["image_path"]
    stem = posixpath.splitext(posixpath.basename(ann_path))[0]
    try:
        xml = read(ann_path)
    except FileNotFoundError:
        if img_path is None:
            raise AnnotationError(ann_path, f"split entry {stem!r} has no annotation file and no image file") from None
        raise AnnotationError(ann_path, "annotation file not found") from None
    if img_path is None:
        expected = posixpath.join(item["year_dir"], "JPEGImages", f"{stem}.jpg")
        raise AnnotationError(expected, "no image file for this split entry (looked for .jpg, .jpeg, .png)")
    return parse_annotation(xml, ann_path, class_names, item["image_id"], left_out)
