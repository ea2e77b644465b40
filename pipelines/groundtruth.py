"""A split's ground truth for evaluation, in the model's classes.

    gt = load_ground_truth("data/synth", "test", model_classes=("ellipse", "cross"))
    gt.boxes["000012"]  # {"boxes": (N, 4) 0-based xyxy original pixels, "labels": 1..C, "difficult"}

The model's class names are the truth: label k is ``model_classes[k - 1]``. The dataset's names
(``classes``, else its ``classes.txt``, else VOC's 20) are mapped onto them; a model class the
dataset lacks is refused (``ClassMismatch`` naming it); objects of dataset classes the model does
not have are left out of the scoring and counted per class in ``GroundTruth.left_out``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from frcnn.errors import DatasetError
from pipelines.storage import Location

__all__ = ["ClassMismatch", "DATASETS", "GroundTruth", "load_ground_truth", "map_classes"]

log = logging.getLogger(__name__)

DATASETS = ("voc",)


class ClassMismatch(DatasetError):
    """The model's classes cannot be scored on this dataset (names the missing ones)."""


@dataclass
class GroundTruth:
    """``boxes``: image id -> {"boxes" (N, 4), "labels" (N,) in the model's 1..C, "difficult" (N,)}."""

    class_names: tuple[str, ...]  # the model's
    image_ids: list[str]
    image_paths: dict[str, str | None]
    boxes: dict[str, dict[str, np.ndarray]]
    problems: int = 0  # objects dropped or clipped (bad boxes...)
    left_out: dict[str, int] = field(default_factory=dict)  # objects of classes the model does not have
    dataset_classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.image_ids)


def map_classes(model_classes: Sequence[str], dataset_classes: Sequence[str], source: str) -> tuple[str, ...]:
    """The dataset classes the model does not have (their objects are left out); raises
    ``ClassMismatch`` for model classes the dataset lacks."""
    missing = [n for n in model_classes if n not in set(dataset_classes)]
    if missing:
        raise ClassMismatch(
            f"model class(es) {', '.join(map(repr, missing))} not in the dataset at {source} (its classes: "
            f"{', '.join(dataset_classes)}); pass --classes if the dataset's list differs")
    return tuple(n for n in dataset_classes if n not in set(model_classes))


def load_ground_truth(data_root: str, split: str, years: Sequence[str] | None = None, *,
                      model_classes: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                      dataset: str = "voc") -> GroundTruth:
    """Read every annotation of a VOC split (in parallel threads: an object store answers slowly).

    ``classes``: the dataset's class names in its label order (default: ``classes.txt``, else VOC's
    20). ``model_classes``: the model's (default: the dataset's)."""
    from pipelines.voc import list_split, load_class_names
    from pipelines.voc_xml import AnnotationError, parse_annotation

    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r}: only {', '.join(DATASETS)} is supported")
    years = [str(y) for y in years] if years else None
    items = list_split(data_root, split, years)
    if not items:
        raise ValueError(f"{data_root}: split {split!r} is empty")
    dataset_classes = tuple(classes) if classes else tuple(load_class_names(data_root))
    names = tuple(model_classes) if model_classes else dataset_classes
    extra = map_classes(names, dataset_classes, Location.of(data_root).shown)

    def read(item):
        try:
            data = Location.of(item.annotation_path).read_bytes()
        except OSError as exc:
            raise AnnotationError(item.annotation_path, f"cannot read annotation file: {exc}") from exc
        return parse_annotation(data, item.annotation_path, names, item.image_id, left_out=extra)

    with ThreadPoolExecutor(max_workers=16) as pool:
        try:
            parsed = list(pool.map(read, items))
        except AnnotationError as exc:
            raise ValueError(f"ground truth incomplete: {exc}") from exc
    boxes: dict[str, dict[str, np.ndarray]] = {}
    n_problems = 0
    left_out: dict[str, int] = {}
    for item, (ann, problems) in zip(items, parsed):
        boxes[item.image_id] = {"boxes": ann.boxes, "labels": ann.labels, "difficult": ann.difficult}
        n_problems += len(problems)
        for name, n in ann.left_out.items():
            left_out[name] = left_out.get(name, 0) + n
        for p in problems[:3]:
            log.warning("ground truth: %s", p)
    if n_problems:
        log.warning("ground truth: %d object(s) dropped or clipped in split %s", n_problems, split)
    if left_out:
        log.warning("ground truth: %d object(s) of classes the model does not have left out of the scoring (%s)",
                    sum(left_out.values()), ", ".join(f"{k}: {v}" for k, v in sorted(left_out.items())))
    return GroundTruth(names, [i.image_id for i in items], {i.image_id: i.image_path for i in items}, boxes,
                       n_problems, left_out, dataset_classes)
