"""A split's ground truth for evaluation, in the model's classes.

    gt = load_ground_truth("data/synth", "test", model_classes=("ellipse", "cross"))
    gt.boxes["000012"]  # {"boxes": (N, 4) 0-based xyxy original pixels, "labels": 1..C, "difficult"}

Any format of ``pipelines.datasets`` (voc, coco, yolo). The model's class names are the truth:
label k is ``model_classes[k - 1]``. The dataset's names (``classes``, else its own list) are mapped
onto them; a model class the dataset lacks is refused (``ClassMismatch`` naming it); objects of dataset
classes the model does not have are left out of the scoring and counted per class in ``GroundTruth.left_out``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from frcnn.errors import DatasetError
from pipelines.datasets import FORMATS, DatasetSource, items_digest
from pipelines.storage import Location

__all__ = ["ClassMismatch", "DATASETS", "GroundTruth", "GroundTruthError", "load_ground_truth", "map_classes"]

log = logging.getLogger(__name__)

DATASETS = FORMATS


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
    source: str = ""  # what the split was read from (the data root, the COCO JSON, data.yaml)
    digest: str = ""  # content hash of the split listing (MLflow's dataset digest)
    skipped: list[dict[str, str]] = field(default_factory=list)  # images left out (on_error="skip")
    original_ids: dict[str, Any] = field(default_factory=dict)  # COCO: image id -> the JSON's id
    category_ids: tuple[int, ...] = ()  # COCO: the category id of each model class

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


class GroundTruthError(DatasetError):
    """An annotation of the split cannot be read (``on_error="fail"``): one line naming the file."""


def load_ground_truth(data: str | DatasetSource, split: str, years: Sequence[str] | None = None, *,
                      model_classes: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                      dataset: str = "voc", on_error: str = "fail") -> GroundTruth:
    """Read every annotation of a split (in parallel threads: an object store answers slowly).

    ``data``: a :class:`~pipelines.datasets.DatasetSource`, or a data root of format ``dataset``.
    ``classes``: the dataset's class names in its label order (default: its own list).
    ``model_classes``: the model's (default: the dataset's). An annotation that cannot be read
    raises :class:`GroundTruthError` (``on_error="fail"``) or leaves its image out of the split
    (``"skip"``; listed in ``GroundTruth.skipped``)."""
    from pipelines.datasets import open_split

    source = data if isinstance(data, DatasetSource) else DatasetSource(dataset, root=str(data))
    if years:
        source = dataclasses.replace(source, years=tuple(str(y) for y in years))
    if classes:
        source = dataclasses.replace(source, classes=tuple(classes))
    reader = open_split(source, split)
    items = reader.items()
    if not items:
        raise DatasetError(f"{source.shown}: split {split!r} is empty")
    names = tuple(model_classes) if model_classes else reader.classes
    extra = map_classes(names, reader.classes, source.shown)
    parsed = _parse_all(items, names, extra, reader.classes)
    gt = GroundTruth(names, [], {}, {}, dataset_classes=reader.classes, source=reader.describe(),
                     digest=items_digest(items), skipped=list(reader.problems))
    _collect(gt, items, parsed, on_error)
    if reader.category_ids:  # COCO: the ids detections go back out with
        gt.original_ids = {i: reader.original_ids[i] for i in gt.image_ids}
        by_name = dict(zip(reader.classes, reader.category_ids))
        gt.category_ids = tuple(by_name[n] for n in names)
    _warn(gt, split)
    return gt


def _parse_all(items, names, extra, dataset_classes) -> list:
    """Each item's ``(annotation, problems)`` or the ``AnnotationError`` that stopped it."""
    from pipelines.datasets import parse_item
    from pipelines.voc_xml import AnnotationError

    def read(path: str) -> bytes:
        return Location.of(path).read_bytes()

    def one(item):
        try:
            return parse_item(dataclasses.asdict(item), read, names, extra, dataset_classes)
        except AnnotationError as exc:
            return exc
        except OSError as exc:
            return AnnotationError(item.annotation_path, f"cannot read: {exc}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, items))


def _collect(gt: GroundTruth, items, parsed, on_error: str) -> None:
    from pipelines.voc_xml import AnnotationError

    for item, result in zip(items, parsed):
        if isinstance(result, AnnotationError):
            if on_error != "skip":
                raise GroundTruthError(f"ground truth incomplete: {result.source}: {result.reason} "
                                       "(--on-error skip leaves such images out)")
            gt.skipped.append({"image_id": item.image_id, "source": result.source, "reason": result.reason})
            continue
        ann, problems = result
        gt.image_ids.append(item.image_id)
        gt.image_paths[item.image_id] = item.image_path
        gt.boxes[item.image_id] = {"boxes": ann.boxes, "labels": ann.labels, "difficult": ann.difficult}
        gt.problems += len(problems)
        for name, n in ann.left_out.items():
            gt.left_out[name] = gt.left_out.get(name, 0) + n
        for p in problems[:3]:
            log.warning("ground truth: %s", p)
    if not gt.image_ids:
        raise GroundTruthError(f"{gt.source}: no annotation of the split could be read "
                               f"(first: {gt.skipped[0]['source']}: {gt.skipped[0]['reason']})")


def _warn(gt: GroundTruth, split: str) -> None:
    if gt.problems:
        log.warning("ground truth: %d object(s) dropped or clipped in split %s", gt.problems, split)
    if gt.skipped:
        log.warning("ground truth: %d image(s) of split %s left out (first: %s: %s)", len(gt.skipped), split,
                    gt.skipped[0]["source"], gt.skipped[0]["reason"])
    if gt.left_out:
        log.warning("ground truth: %d object(s) of classes the model does not have left out of the scoring (%s)",
                    sum(gt.left_out.values()), ", ".join(f"{k}: {v}" for k, v in sorted(gt.left_out.items())))
