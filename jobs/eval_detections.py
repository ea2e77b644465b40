"""Detections read back for ``frcnn-jobs evaluate --detections``: a Parquet file, a folder of
parts or an ``infer`` output, matched onto the split's image ids and the ground truth's labels."""

from __future__ import annotations

import logging
import posixpath
import re
from typing import Any

import numpy as np

from frcnn.errors import DatasetError

__all__ = ["EvaluationError", "detections_from_file", "per_image_detections", "split_id"]

log = logging.getLogger(__name__)


class EvaluationError(DatasetError):
    """An evaluation that cannot be run as asked (wrong classes, bad detections file...)."""


def per_image_detections(table, remap: dict[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """PREDICTION/OUTPUT_SCHEMA rows -> image id -> {"boxes" (N, 4), "scores", "labels"}."""
    from pipelines.detections import list_column

    boxes = list_column(table.column("boxes"), np.float32)
    scores = list_column(table.column("scores"), np.float32)
    labels = list_column(table.column("labels"), np.int32)
    out = {}
    for k, image_id in enumerate(table.column("image_id").to_pylist()):
        if boxes[k].size != 4 * scores[k].size or scores[k].size != labels[k].size:
            raise EvaluationError(f"image {image_id!r}: {boxes[k].size} box values, {scores[k].size} scores, "
                                  f"{labels[k].size} labels (need 4 box values per score and label)")
        lab = labels[k] if remap is None else np.array([remap.get(int(x), -1) for x in labels[k]], np.int32)
        out[str(image_id)] = {"boxes": boxes[k].reshape(-1, 4), "scores": scores[k], "labels": lab}
    return out


def split_id(image_id: str, known: set[str]) -> str:
    """A detections row's id as the split names it: infer names an image by its path under the
    input (``000001.jpg``, ``VOC2007/JPEGImages/000001.jpg``), the split by the bare id (``000001``,
    or ``2007/000001`` when several years are joined)."""
    if image_id in known:
        return image_id
    parts = image_id.replace("\\", "/").split("/")
    stem = posixpath.splitext(parts[-1])[0]
    years = [m.group(1) for p in parts[:-1] if (m := re.match(r"^VOC(\d{4})$", p))]
    for key in ([f"{years[-1]}/{stem}"] if years else []) + [stem]:
        if key in known:
            return key
    return image_id


def detections_from_file(path: str, gt) -> tuple[dict, set[str], dict[str, int], dict[str, str]]:
    """``(detections per split image, ids with errors, counts, the model that made them)``."""
    from pipelines.detections import read_detections

    try:
        table, errors_table = read_detections(path)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from exc
    runs = table.column("run").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda k: runs[k] or ""))  # newer partitions win
    remap = _label_remap(table, gt, path)
    models = _models_in(table, path)
    table = _with_split_ids(table, set(gt.image_ids), path)
    try:
        per_image = per_image_detections(table, remap)
    except EvaluationError as exc:
        raise EvaluationError(f"{path}: {exc}") from exc
    dets, errors, counts = _match_split(per_image, errors_table, gt, path)
    return dets, errors, counts, _made_by(table, models)


def _label_remap(table, gt, path: str) -> dict[int, int] | None:
    """infer's rows name each label: the map of the model's labels onto the ground truth's."""
    if not [n for n in table.column("class_names").to_pylist() if n]:
        return None
    pairs = {(int(lab), name) for labs, ns in zip(table.column("labels").to_pylist(),
                                                  table.column("class_names").to_pylist()) if ns
             for lab, name in zip(labs, ns)}
    unknown = sorted({n for _, n in pairs if n not in gt.class_names})
    if unknown:
        raise EvaluationError(f"{path}: detections of class(es) {unknown} the dataset does not have "
                              f"(its classes: {list(gt.class_names)}); pass --classes if its list differs")
    return {lab: gt.class_names.index(n) + 1 for lab, n in pairs}


def _models_in(table, path: str) -> set[tuple]:
    from pipelines.detections import MODEL_COLUMNS

    models = {tuple(r[c] for c in MODEL_COLUMNS) for r in table.select(list(MODEL_COLUMNS)).to_pylist()}
    models = {m for m in models if any(v is not None for v in m)}
    if len(models) > 1:
        shown = sorted(f"{m[0]}/{m[1]}" if m[0] else f"sha256 {str(m[3])[:12]}" for m in models)
        raise EvaluationError(f"{path}: detections of {len(models)} models ({', '.join(shown)}); point "
                              f"--detections at one run=... partition or file")
    return models


def _with_split_ids(table, known: set[str], path: str):
    """The table with each row's image id as the split names it; one row per image and run."""
    import pyarrow as pa

    ids = [split_id(str(i), known) for i in table.column("image_id").to_pylist()]
    seen: dict[str, Any] = {}
    for image_id, run in zip(ids, table.column("run").to_pylist()):
        if image_id in seen and seen[image_id] == run:
            raise EvaluationError(f"{path}: image_id {image_id!r} appears more than once"
                                  + (f" in {run}" if run else ""))
        seen[image_id] = run
    return table.set_column(0, "image_id", pa.array(ids, pa.string()))


def _match_split(per_image: dict, errors_table, gt, path: str) -> tuple[dict, set[str], dict[str, int]]:
    """The split's detections, its images with errors, and the counts of missing/extra images."""
    import pyarrow.compute as pc

    known = set(gt.image_ids)
    dets = {i: d for i, d in per_image.items() if i in known}
    errors = {split_id(str(i), known) for i in pc.drop_null(errors_table.column("image_id")).to_pylist()}
    errors = {i for i in errors if i in known and i not in dets}
    extra = len(set(per_image) - known)
    if per_image and not dets:
        raise EvaluationError(f"{path}: none of its {len(per_image)} image ids is in the split (e.g. "
                              f"{next(iter(per_image))!r}; the split has e.g. {gt.image_ids[0]!r})")
    for image_id, d in dets.items():
        bad = (d["labels"] < 1) | (d["labels"] > len(gt.class_names))
        if bad.any():
            raise EvaluationError(f"{path}: image {image_id!r}: label {int(d['labels'][bad][0])} outside "
                                  f"1..{len(gt.class_names)} (classes {list(gt.class_names)})")
    missing = len(known - set(dets) - errors)
    if extra:
        log.warning("%s: %d image(s) not in the split ignored", path, extra)
    if missing:
        log.warning("%s: %d image(s) of the split have no detections row; counted as no detections", path, missing)
    return dets, errors, {"images_missing": missing, "images_extra": extra}


def _made_by(table, models: set[tuple]) -> dict[str, str]:
    from pipelines.detections import MODEL_COLUMNS

    made_by = {c: str(v) for c, v in zip(MODEL_COLUMNS, next(iter(models), ())) if v is not None}
    first = table.column("train_run_id").drop_null().to_pylist()[:1]
    if first:
        made_by["train_run_id"] = first[0]
    return made_by
