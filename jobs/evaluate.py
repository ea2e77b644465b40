"""``frcnn-jobs evaluate``, ``frcnn-jobs promote`` and ``frcnn-jobs ui``.

    frcnn-jobs evaluate --model models:/frcnn@champion --dataset voc --data-root data/voc --split test
    frcnn-jobs evaluate --detections out/detections.parquet --dataset voc --data-root data/voc --split test
    frcnn-jobs promote models:/frcnn/3 --alias champion --if-better-than champion --metric map50
    frcnn-jobs ui --port 5000

Evaluation
----------
``run_evaluation`` reads the split's ground truth with ``pipelines.voc`` (difficult objects kept,
0-based xyxy boxes in original pixels), runs the model over the split with Ray Data (a read task,
then ``pipelines.predict.Predictor`` in an actor pool) or reads a detections Parquet written by
``infer``, and scores the detections with VOC mAP@0.5 (all-point ``map50`` and 11-point
``map50_voc07``, per-class AP) and COCO AP (pycocotools). No extra score threshold is applied: the
model's own ``roi.score_thresh`` is the only one.

Each evaluation is its own MLflow run (``evaluate-<split>``), linked to what it evaluated by tags
(``frcnn.job=evaluate``, ``frcnn.dataset``, ``frcnn.split``, ``frcnn.data_root``,
``frcnn.model_uri``, ``frcnn.model_name``, ``frcnn.model_version``, ``frcnn.train_run_id``), never
nested under the training run, so it shows as a row of its own. Artifacts: ``per_class.csv``,
``pr_curves.png``, ``detections_grid.png`` and ``detections.parquet``. A registered model version
also gets tags ``map50_<split>``, ``map50_voc07_<split>``, ``coco_map_<split>`` and
``eval_run_<split>``, so the registry page shows its numbers.

Promotion
---------
``promote`` sets a registry alias. With ``if_better_than`` it compares the latest FINISHED
evaluation runs of the candidate and of the version holding that alias, on the same dataset, split,
data root and years, and moves the alias only when the candidate is strictly better (every metric
here is higher-is-better) or when nobody holds the alias yet.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import click
import numpy as np

from . import options, tracking
from pipelines.storage import init_ray
from pipelines.infer import ERRORS as INFER_ERRORS

log = logging.getLogger(__name__)

DATASETS = ("voc",)
GRID_IMAGES = 12
GRID_SCORE_THRESHOLD = 0.3  # draw_detections' default: boxes drawn in the grid and "misses" use it
HEADLINE = ("map50", "map50_voc07", "coco_map", "coco_ap50", "coco_ap75", "coco_ap_small", "coco_ap_medium",
            "coco_ap_large")
VERSION_TAG_METRICS = ("map50", "map50_voc07", "coco_map")
DETECTION_COLUMNS = ("image_id", "boxes", "scores", "labels")


class EvaluationError(ValueError):
    """An evaluation that cannot be run as asked (wrong classes, bad detections file...)."""


class PromotionError(click.ClickException):
    """A promotion that cannot be decided (missing evaluation, unknown version...)."""


@dataclass
class GroundTruth:
    """A split's ground truth: ``boxes`` (N, 4) 0-based xyxy original pixels, ``labels``, ``difficult``."""

    class_names: tuple[str, ...]
    image_ids: list[str]
    image_paths: dict[str, str | None]
    boxes: dict[str, dict[str, np.ndarray]]
    problems: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class EvaluationResult:
    run_id: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]  # class, num_gt, num_det, ap_voc, ap_voc07
    model: Any = None  # jobs.models.ModelRef, None for a detections file
    tags: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def load_ground_truth(data_root: str, split: str, years: Sequence[str] | None = None,
                      dataset: str = "voc") -> GroundTruth:
    """Read every annotation of a VOC split (in parallel: an object store answers slowly)."""
    from pipelines.voc import AnnotationError, list_split, load_class_names, read_annotation

    if dataset not in DATASETS:
        raise EvaluationError(f"dataset {dataset!r}: only {', '.join(DATASETS)} is supported")
    years = [str(y) for y in years] if years else None
    items = list_split(data_root, split, years)
    if not items:
        raise EvaluationError(f"{data_root}: split {split!r} is empty")
    names = tuple(load_class_names(data_root))

    def read(item):
        return read_annotation(item.annotation_path, names, item.image_id)

    with ThreadPoolExecutor(max_workers=16) as pool:
        try:
            parsed = list(pool.map(read, items))
        except AnnotationError as exc:
            raise EvaluationError(f"ground truth incomplete: {exc}") from exc
    boxes: dict[str, dict[str, np.ndarray]] = {}
    n_problems = 0
    for item, (ann, problems) in zip(items, parsed):
        boxes[item.image_id] = {"boxes": ann.boxes, "labels": ann.labels, "difficult": ann.difficult}
        n_problems += len(problems)
        for p in problems[:3]:
            log.warning("ground truth: %s", p)
    if n_problems:
        log.warning("ground truth: %d object(s) dropped or clipped in split %s", n_problems, split)
    return GroundTruth(names, [i.image_id for i in items], {i.image_id: i.image_path for i in items}, boxes,
                       n_problems)


def check_class_names(model_cfg, class_names: Sequence[str]) -> None:
    """Refuse a model whose classes are not the dataset's (same names, same order)."""
    names = tuple(class_names)
    own = tuple(getattr(model_cfg, "class_names", ()) or ())
    if own and own != names:
        raise EvaluationError(
            f"the model's classes {list(own)} are not the dataset's {list(names)} (order matters: label k is "
            f"class k); evaluate it on the dataset it was trained for")
    if not own and model_cfg.num_classes != len(names):
        raise EvaluationError(
            f"the model predicts {model_cfg.num_classes} classes, the dataset has {len(names)}: {list(names)}")


# ---------------------------------------------------------------------------------------------
# Detections: from a model (Ray Data) or from a Parquet file
# ---------------------------------------------------------------------------------------------


def _read_image_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: path -> encoded bytes (empty bytes when unreadable: the Predictor reports it)."""
    from pipelines.voc import read_bytes, resolve_filesystem

    try:
        fs, path = resolve_filesystem(row["path"])
        data = read_bytes(fs, path)
    except Exception as exc:  # noqa: BLE001 - becomes an error row, not a dead job
        logging.getLogger(__name__).warning("cannot read %s: %s", row["path"], exc)
        data = b""
    return {"image_id": row["image_id"], "image": data}


def predict_split(gt: GroundTruth, checkpoint: bytes, *, batch_size: int = 8, concurrency: int = 1,
                  gpus_per_actor: float = 0, cpus_per_actor: float = 1,
                  address: str | None = None) -> list[dict[str, Any]]:
    """Detections for every image of ``gt`` (rows as ``Predictor`` writes them), in split order."""
    import ray

    from pipelines.predict import Predictor

    rows = [{"image_id": i, "path": gt.image_paths[i]} for i in gt.image_ids if gt.image_paths[i]]
    missing = [i for i in gt.image_ids if not gt.image_paths[i]]
    out: list[dict[str, Any]] = []
    if rows:
        init_ray(address)
        ds = ray.data.from_items(rows).map(_read_image_row, num_cpus=0.25)
        kwargs: dict[str, Any] = {}
        if gpus_per_actor:
            kwargs["num_gpus"] = gpus_per_actor
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"checkpoint": checkpoint,
                                   "torch_threads": None if gpus_per_actor else max(1, int(cpus_per_actor))},
            batch_size=int(batch_size), compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=cpus_per_actor, batch_format="numpy", **kwargs)
        out = [_normalise_row(r) for r in ds.take_all()]
    for image_id in missing:
        out.append(_empty_row(image_id, "no image file for this id (JPEGImages/<id>.jpg|.jpeg|.png)"))
    order = {i: k for k, i in enumerate(gt.image_ids)}
    out.sort(key=lambda r: order.get(r["image_id"], len(order)))
    return out


def _normalise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    error = row.get("error")
    if error is not None and not isinstance(error, str):
        error = None if (isinstance(error, float) and math.isnan(error)) else str(error)
    return {
        "image_id": str(row["image_id"]),
        "boxes": np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray(row["scores"], dtype=np.float32).reshape(-1),
        "labels": np.asarray(row["labels"], dtype=np.int32).reshape(-1),
        "height": int(row.get("height", -1) if row.get("height") is not None else -1),
        "width": int(row.get("width", -1) if row.get("width") is not None else -1),
        "error": error or None,
    }


def _list_column(column) -> list[np.ndarray]:
    """A pyarrow list column -> one numpy array per row (a null list is empty)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.LargeListArray | pa.ListArray):
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=False)
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        return [values[offsets[i]:offsets[i + 1]] if valid[i] else values[:0] for i in range(len(arr))]
    if isinstance(arr, pa.FixedSizeListArray):
        return [np.asarray(v, dtype=np.float64) for v in arr.to_pylist()]
    raise EvaluationError(f"expected a list column, got {arr.type}")


MODEL_COLUMNS = ("model_name", "model_version", "model_uri", "model_sha256", "train_run_id")


def _detection_files(path: str):
    """``(fs, [(detection files, error files)] per partition, oldest first)`` for a detections path:
    a Parquet file; a folder of ``*.parquet`` parts (plus ``_errors/``); or an ``infer`` output root,
    whose published ``run=...`` partitions (those holding ``_SUCCESS``) are read, never staging."""
    import pyarrow.fs as pafs

    from pipelines.voc import resolve_filesystem

    fs, root = resolve_filesystem(path)
    root = root.rstrip("/") or "/"
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: detections file not found")
    if kind == pafs.FileType.File:
        return fs, [([root], [])]

    def listing(folder: str):
        return fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))

    def parquet(folder: str) -> list[str]:
        return sorted(i.path for i in listing(folder) if i.type == pafs.FileType.File
                      and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", ".")))

    entries = listing(root)
    runs = sorted(i.path for i in entries if i.type == pafs.FileType.Directory and i.base_name.startswith("run="))
    if runs:
        published = [r for r in runs if fs.get_file_info(f"{r}/_SUCCESS").type == pafs.FileType.File]
        if not published:
            raise EvaluationError(f"{path}: no published run=... partition (none holds _SUCCESS yet)")
        parts = published
    else:
        parts = [root]
    out = [(parquet(d), parquet(f"{d}/{INFER_ERRORS}")) for d in parts]
    if not any(det for det, _ in out):
        raise EvaluationError(f"{path}: no *.parquet detections inside")
    return fs, out


def _table_rows(table, source: str) -> list[dict[str, Any]]:
    missing = [c for c in DETECTION_COLUMNS if c not in table.column_names]
    if missing:
        raise EvaluationError(f"{source}: missing column(s) {missing}; need {list(DETECTION_COLUMNS)} "
                              f"(what `frcnn-jobs infer` writes)")
    n = table.num_rows
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    boxes, scores, labels = (_list_column(table.column(c)) for c in ("boxes", "scores", "labels"))

    def col(name: str, default: Any) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [default] * n

    errors, heights, widths = col("error", None), col("height", -1), col("width", -1)
    model = {c: col(c, None) for c in MODEL_COLUMNS}
    rows, seen = [], set()
    for k, image_id in enumerate(ids):
        if image_id in seen:
            raise EvaluationError(f"{source}: image_id {image_id!r} appears more than once")
        seen.add(image_id)
        b = np.asarray(boxes[k], dtype=np.float32)
        if b.size % 4:
            raise EvaluationError(f"{source}: image {image_id!r}: boxes has {b.size} values, not a multiple of 4")
        if not (len(scores[k]) == len(labels[k]) == b.size // 4):
            raise EvaluationError(f"{source}: image {image_id!r}: {b.size // 4} boxes, {len(scores[k])} scores, "
                                  f"{len(labels[k])} labels")
        row = _normalise_row({"image_id": image_id, "boxes": b, "scores": scores[k], "labels": labels[k],
                              "error": errors[k], "height": heights[k], "width": widths[k]})
        row["model"] = tuple(model[c][k] for c in MODEL_COLUMNS)
        rows.append(row)
    return rows


def read_detections(path: str) -> list[dict[str, Any]]:
    """Rows of a detections Parquet, local or a URI: one file, a folder of parts, or an ``infer``
    output (its published partitions; their ``_errors/`` tables become rows with an error).
    Columns: ``image_id``, ``boxes`` (list<float32>, N x 4 flattened, original pixels), ``scores``,
    ``labels``; optional ``error``, ``height``, ``width`` and infer's model columns. Each row also
    gets ``model``: (model_name, model_version, model_uri, model_sha256, train_run_id), Nones when
    absent. Detections of one image from several partitions: the newest wins, and every row must come
    from one model (else point at one ``run=...`` partition)."""
    import pyarrow.parquet as pq

    fs, parts = _detection_files(path)

    def read(file: str):
        try:
            return pq.read_table(file, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a non-Parquet file
            raise EvaluationError(f"{file}: not a readable Parquet file: {exc}") from exc

    by_id: dict[str, dict[str, Any]] = {}
    for det_files, err_files in parts:
        part: dict[str, dict[str, Any]] = {}
        for file in det_files:
            for row in _table_rows(read(file), file):
                if row["image_id"] in part:
                    raise EvaluationError(f"{path}: image_id {row['image_id']!r} appears more than once in a run")
                part[row["image_id"]] = row
        by_id.update(part)  # a newer partition's detections replace an older one's
        for file in err_files:
            table = read(file)
            if "image_id" not in table.column_names:
                continue
            reasons = (table.column("reason").to_pylist() if "reason" in table.column_names
                       else ["unreadable"] * table.num_rows)
            for image_id, reason in zip(table.column("image_id").to_pylist(), reasons):
                if image_id is not None and str(image_id) not in by_id:  # a detection elsewhere wins
                    by_id[str(image_id)] = {**_empty_row(str(image_id), str(reason or "unreadable")),
                                            "model": (None,) * len(MODEL_COLUMNS)}
    models = {r["model"] for r in by_id.values() if not r.get("error") and any(v is not None for v in r["model"])}
    if len(models) > 1:
        shown = sorted(f"{m[0]}/{m[1]}" if m[0] else f"sha256 {str(m[3])[:12]}" for m in models)
        raise EvaluationError(f"{path}: detections of {len(models)} models ({', '.join(shown)}); point "
                              f"--detections at one run=... partition or file")
    return list(by_id.values())


def _empty_row(image_id: str, error: str) -> dict[str, Any]:
    return {"image_id": image_id, "boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
            "labels": np.zeros(0, np.int32), "height": -1, "width": -1, "error": error}


def detections_model(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The model that made the detections, from infer's columns: {} when unknown."""
    for r in rows:
        m = r.get("model")
        if m and not r.get("error") and any(v is not None for v in m):
            return {k: str(v) for k, v in zip(MODEL_COLUMNS, m) if v is not None}
    return {}


def split_ids_for(rows: Sequence[Mapping[str, Any]], gt: GroundTruth) -> list[dict[str, Any]]:
    """Give detections the split's image ids: infer names an image by its path under the input
    folder (``000001.jpg``, ``VOC2007/JPEGImages/000001.jpg``), the split by the bare id
    (``000001``, or ``2007/000001`` when several years are joined)."""
    known = set(gt.image_ids)
    out = []
    for r in rows:
        image_id = r["image_id"]
        if image_id not in known:
            parts = image_id.replace("\\", "/").split("/")
            stem = posixpath.splitext(parts[-1])[0]
            years = [m.group(1) for p in parts[:-1] if (m := re.match(r"^VOC(\d{4})$", p))]
            for key in ([f"{years[-1]}/{stem}"] if years else []) + [stem]:
                if key in known:
                    image_id = key
                    break
        out.append({**r, "image_id": image_id})
    return out


def write_detections(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """The same schema ``read_detections`` reads (boxes flattened)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
        "boxes": pa.array([np.asarray(r["boxes"], np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "scores": pa.array([np.asarray(r["scores"], np.float32) for r in rows], pa.list_(pa.float32())),
        "labels": pa.array([np.asarray(r["labels"], np.int32) for r in rows], pa.list_(pa.int32())),
        "height": pa.array([int(r.get("height", -1)) for r in rows], pa.int32()),
        "width": pa.array([int(r.get("width", -1)) for r in rows], pa.int32()),
        "error": pa.array([r.get("error") for r in rows], pa.string()),
    })
    pq.write_table(table, path)


def match_detections(rows: Sequence[Mapping[str, Any]], gt: GroundTruth, source: str) -> tuple[dict, dict[str, int]]:
    """Detections keyed by image id, restricted to the split; counts of what did not line up."""
    known = set(gt.image_ids)
    seen: set[str] = set()
    for r in rows:
        if r["image_id"] in known and r["image_id"] in seen:
            raise EvaluationError(f"{source}: two detection rows for split image {r['image_id']!r}")
        seen.add(r["image_id"])
    dets = {r["image_id"]: {"boxes": r["boxes"], "scores": r["scores"], "labels": r["labels"]}
            for r in rows if r["image_id"] in known}
    extra = sum(1 for r in rows if r["image_id"] not in known)
    if rows and not dets:
        example = rows[0]["image_id"]
        raise EvaluationError(f"{source}: none of its {len(rows)} image ids is in the split (e.g. {example!r}; "
                              f"the split has e.g. {gt.image_ids[0]!r})")
    missing = len(known) - len(dets)
    if extra:
        log.warning("%s: %d image(s) not in the split ignored", source, extra)
    if missing:
        log.warning("%s: %d image(s) of the split have no detections row; counted as no detections", source, missing)
    n = len(gt.class_names)
    for image_id, d in dets.items():
        bad = (d["labels"] < 1) | (d["labels"] > n)
        if bad.any():
            raise EvaluationError(f"{source}: image {image_id!r}: label {int(d['labels'][bad][0])} outside 1..{n} "
                                  f"(classes {list(gt.class_names)})")
    return dets, {"images_missing": missing, "images_extra": extra}


# ---------------------------------------------------------------------------------------------
# Metrics, tables, pictures
# ---------------------------------------------------------------------------------------------


def compute_metrics(dets: Mapping[str, Mapping[str, Any]], gt: GroundTruth):
    """``(metrics, per_class rows, VocResult)``: VOC all-point and 11-point, COCO."""
    from frcnn.evaluation import evaluate_coco, evaluate_voc

    voc = evaluate_voc(dets, gt.boxes, gt.class_names)
    voc07 = evaluate_voc(dets, gt.boxes, gt.class_names, use_07_metric=True)
    coco = evaluate_coco(dets, gt.boxes, gt.class_names)
    metrics: dict[str, float] = {"map50": float(voc.map), "map50_voc07": float(voc07.map)}
    metrics.update({f"coco_{k}": float(v) for k, v in coco.items()})
    per_class = []
    for name in gt.class_names:
        metrics[f"ap50_{_metric_safe(name)}"] = float(voc.ap[name])
        per_class.append({"class": name, "num_gt": voc.num_gt[name], "num_det": voc.num_det[name],
                          "ap_voc": float(voc.ap[name]), "ap_voc07": float(voc07.ap[name])})
    return metrics, per_class, voc


def _metric_safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def write_per_class_csv(per_class: Sequence[Mapping[str, Any]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["class", "num_gt", "num_det", "ap_voc", "ap_voc07"])
        w.writeheader()
        for row in per_class:
            w.writerow({**row, "ap_voc": f"{row['ap_voc']:.6f}", "ap_voc07": f"{row['ap_voc07']:.6f}"})


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M, N) IoU of 0-based continuous xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def count_misses(gt: Mapping[str, np.ndarray], det: Mapping[str, np.ndarray] | None,
                 score_threshold: float = GRID_SCORE_THRESHOLD, iou_threshold: float = 0.5) -> int:
    """Non-difficult objects without a same-class detection (score >= threshold, IoU >= 0.5)."""
    boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
    keep = ~np.asarray(gt["difficult"], bool)
    boxes, labels = boxes[keep], np.asarray(gt["labels"])[keep]
    if not len(boxes):
        return 0
    if det is None:
        return len(boxes)
    s = np.asarray(det["scores"]).reshape(-1)
    sel = s >= score_threshold
    d_boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)[sel]
    d_labels = np.asarray(det["labels"]).reshape(-1)[sel]
    if not len(d_boxes):
        return len(boxes)
    iou = _iou(boxes, d_boxes)
    iou[labels[:, None] != d_labels[None, :]] = 0.0
    return int((iou.max(axis=1) < iou_threshold).sum())


def select_grid_images(gt: GroundTruth, dets: Mapping[str, Mapping[str, Any]], errors: set[str],
                       n: int = GRID_IMAGES) -> list[str]:
    """Deterministic choice: up to half the images with the most misses, the rest spread evenly
    over the split (in split order)."""
    usable = [i for i in gt.image_ids if gt.image_paths.get(i) and i not in errors]
    if not usable:
        return []
    misses = {i: count_misses(gt.boxes[i], dets.get(i)) for i in usable}
    missed = sorted((i for i in usable if misses[i] > 0), key=lambda i: (-misses[i], i))[: n // 2]
    rest = [i for i in usable if i not in set(missed)]
    k = min(n - len(missed), len(rest))
    spread = [rest[int(j * len(rest) / k)] for j in range(k)] if k else []
    chosen = set(missed) | set(spread)
    return [i for i in gt.image_ids if i in chosen]


def draw_grid(gt: GroundTruth, dets: Mapping[str, Mapping[str, Any]], image_ids: Sequence[str], path: str) -> bool:
    """``detections_grid.png``: predictions (class colours) and ground truth (dashed green)."""
    from frcnn.visualize import draw_detections, image_grid
    from pipelines.predict import read_image
    from pipelines.voc import read_bytes, resolve_filesystem

    tiles = []
    for image_id in image_ids:
        try:
            fs, p = resolve_filesystem(gt.image_paths[image_id])
            image = read_image(read_bytes(fs, p))
        except Exception as exc:  # noqa: BLE001 - a picture is a nicety; skip what cannot be read
            log.warning("grid: cannot read %s: %s", image_id, exc)
            continue
        tiles.append(draw_detections(image, gt.boxes[image_id], dets.get(image_id), gt.class_names))
    if not tiles:
        return False
    image_grid(tiles, cols=4, cell=256).save(path, format="PNG")
    return True


def format_table(per_class: Sequence[Mapping[str, Any]], metrics: Mapping[str, float]) -> str:
    width = max([len("class")] + [len(r["class"]) for r in per_class])
    lines = [f"{'class':<{width}}  {'gt':>6}  {'det':>7}  {'AP50':>6}  {'AP50-07':>7}"]
    for r in per_class:
        lines.append(f"{r['class']:<{width}}  {r['num_gt']:>6}  {r['num_det']:>7}  {_fmt(r['ap_voc']):>6}  "
                     f"{_fmt(r['ap_voc07']):>7}")
    lines.append("")
    lines.append("  ".join(f"{k}={_fmt(metrics[k])}" for k in HEADLINE if k in metrics))
    extra = [k for k in ("images", "images_with_errors", "images_missing", "images_per_s") if k in metrics]
    lines.append("  ".join(f"{k}={metrics[k]:.4g}" for k in extra))
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


# ---------------------------------------------------------------------------------------------
# The evaluation job
# ---------------------------------------------------------------------------------------------


def run_evaluation(model: str | None = None, detections: str | None = None, *, data_root: str,
                   split: str = "test", dataset: str = "voc", years: Sequence[str] | None = None,
                   experiment: str = tracking.DEFAULT_EXPERIMENT, address: str | None = None,
                   batch_size: int = 8, concurrency: int = 1, gpus_per_actor: float = 0,
                   cpus_per_actor: float = 1, tracking_uri: str | None = None,
                   grid_images: int = GRID_IMAGES, verbose: bool = True) -> EvaluationResult:
    """Evaluate a MODEL reference (inference with Ray Data) or a detections Parquet on a VOC split;
    log one MLflow run; return its id, metrics and per-class rows."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from frcnn.config import ModelConfig
    from frcnn.training import load_checkpoint
    from frcnn.visualize import plot_pr_curves

    from .models import resolve_model

    if (model is None) == (detections is None):
        raise EvaluationError("give exactly one of a model (--model) or a detections file (--detections)")
    uri = tracking.setup(tracking_uri, experiment)
    client = MlflowClient(uri)
    gt = load_ground_truth(data_root, split, years, dataset)
    fs_root = _shown_root(data_root)

    ref = None
    ckpt_bytes = b""
    model_cfg = None
    if model is not None:
        ref = resolve_model(model, client)  # once: an alias is pinned to its version now
        ckpt_bytes = Path(ref.checkpoint).read_bytes()
        model_cfg = ModelConfig.from_dict(load_checkpoint(io.BytesIO(ckpt_bytes))["model_config"])
        check_class_names(model_cfg, gt.class_names)
    else:
        src_rows = split_ids_for(read_detections(detections), gt)
        dets, counts = match_detections(src_rows, gt, detections)
        made_by = detections_model(src_rows)

    tags = {"frcnn.job": "evaluate", "frcnn.dataset": dataset, "frcnn.split": split, "frcnn.data_root": fs_root,
            "frcnn.years": ",".join(map(str, years)) if years else "all"}
    if ref is not None:
        tags["frcnn.model_uri"] = ref.uri
        tags["frcnn.checkpoint"] = ref.checkpoint
        for key, value in (("frcnn.model_name", ref.name), ("frcnn.model_version", ref.version),
                           ("frcnn.train_run_id", ref.run_id)):
            if value:
                tags[key] = str(value)
    else:
        # Detections written by `infer` name their model: the evaluation is then that model's, and
        # `promote` finds it like one made with --model.
        # Only a complete set counts as that model's evaluation (a partial one would under-score it).
        tags["frcnn.detections"] = detections
        prefix = "frcnn." if not counts["images_missing"] else "frcnn.detections_"
        if made_by and counts["images_missing"]:
            log.warning("%s: %d split image(s) without a row: not recorded as an evaluation of %s", detections,
                        counts["images_missing"], made_by.get("model_uri") or made_by.get("model_sha256"))
        for key in ("model_uri", "model_name", "model_version", "train_run_id"):
            if made_by.get(key):
                tags[f"{prefix}{key}"] = made_by[key]
    params: dict[str, Any] = {"model": model, "detections": detections, "dataset": dataset, "data_root": fs_root,
                              "split": split, "years": ",".join(map(str, years)) if years else "all", "images": len(gt)}
    if model_cfg is not None:
        params.update({"batch_size": batch_size, "concurrency": concurrency, "gpus_per_actor": gpus_per_actor,
                       "cpus_per_actor": cpus_per_actor, "address": address,
                       "score_thresh": model_cfg.roi.score_thresh, "nms_thresh": model_cfg.roi.nms_thresh,
                       "detections_per_img": model_cfg.roi.detections_per_img,
                       "canvas": f"{model_cfg.canvas.height}x{model_cfg.canvas.width}"})

    with mlflow.start_run(run_name=f"evaluate-{split}") as run:
        run_id = run.info.run_id
        mlflow.set_tags(tags)
        tracking.log_params(params)
        extra: dict[str, float] = {}
        if ref is not None:
            t0 = time.perf_counter()
            rows = predict_split(gt, ckpt_bytes, batch_size=batch_size, concurrency=concurrency,
                                 gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, address=address)
            elapsed = time.perf_counter() - t0
            dets, counts = match_detections(rows, gt, "inference")
            extra = {"images_per_s": len(gt) / max(elapsed, 1e-9), "inference_s": elapsed}
        else:
            rows = src_rows
        errors = {r["image_id"] for r in rows if r.get("error")}
        for r in [r for r in rows if r.get("error")][:5]:
            log.warning("image %s: %s", r["image_id"], r["error"])
        metrics, per_class, voc = compute_metrics(dets, gt)
        metrics.update({"images": float(len(gt)), "images_with_errors": float(len(errors & set(gt.image_ids))),
                        "num_detections": float(sum(len(d["scores"]) for d in dets.values())), **extra})
        if detections is not None:
            metrics["images_missing"] = float(counts["images_missing"])
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})

        tmp = tempfile.mkdtemp(prefix="frcnn-eval-")
        try:
            write_per_class_csv(per_class, os.path.join(tmp, "per_class.csv"))
            plot_pr_curves(voc, os.path.join(tmp, "pr_curves.png"))
            chosen = select_grid_images(gt, dets, errors, grid_images)
            draw_grid(gt, dets, chosen, os.path.join(tmp, "detections_grid.png"))
            write_detections(rows, os.path.join(tmp, "detections.parquet"))
            mlflow.log_artifacts(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if tags.get("frcnn.model_name") and tags.get("frcnn.model_version"):
            _tag_model_version(client, tags["frcnn.model_name"], tags["frcnn.model_version"], split, metrics, run_id)

    result = EvaluationResult(run_id, metrics, per_class, ref, tags)
    if verbose:
        what = ref.label if ref is not None else detections
        print(f"evaluation of {what} on {dataset} {split} ({len(gt)} images)", flush=True)
        print(format_table(per_class, metrics), flush=True)
        if errors:
            print(f"warning: {len(errors)} image(s) could not be read; counted as images without detections")
        print(f"MLflow evaluation run {run_id} (tracking {uri})", flush=True)
    return result


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _shown_root(data_root: str) -> str:
    """The data root as recorded in tags: a URI as given, a local path made absolute."""
    return data_root if _URI.match(data_root) else os.path.abspath(os.path.expanduser(data_root))


def _tag_model_version(client, name: str, version: str, split: str, metrics: Mapping[str, float], run_id: str) -> None:
    try:
        client.get_model_version(name, version)
    except Exception:  # noqa: BLE001 - e.g. detections made with another tracking store's model
        log.info("models:/%s/%s is not in this registry: no version tags set", name, version)
        return
    for key in VERSION_TAG_METRICS:
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            tracking.safe(client.set_model_version_tag, name, version, f"{key}_{split}", f"{value:.4f}")
    tracking.safe(client.set_model_version_tag, name, version, f"eval_run_{split}", run_id)


# ---------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    promoted: bool
    message: str
    metric: str | None = None
    candidate_value: float | None = None
    incumbent_version: str | None = None
    incumbent_value: float | None = None
    candidate_run_id: str | None = None
    incumbent_run_id: str | None = None


def parse_version_ref(ref: str, client=None) -> tuple[str, str]:
    """``models:/NAME/VERSION``, ``NAME/VERSION`` or ``models:/NAME@ALIAS`` -> (name, version)."""
    body = ref[len("models:/"):] if ref.startswith("models:/") else ref
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = _client(client).get_model_version_by_alias(name, alias)
        return mv.name, str(mv.version)
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise PromotionError(f"{ref}: expected a registry version, models:/NAME/VERSION or NAME/VERSION")
    return name, version


def _client(client=None):
    from mlflow.tracking import MlflowClient

    return client or MlflowClient()


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def latest_evaluation(client, name: str, version: str, *, split: str, dataset: str = "voc",
                      data_root: str | None = None, years: str | None = None):
    """The latest FINISHED evaluation run of a model version on a dataset and split (optionally a
    data root and years), across every experiment; None when there is none."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return None
    filt = (f"tags.`frcnn.job` = 'evaluate' and tags.`frcnn.model_name` = {_q(name)} and "
            f"tags.`frcnn.model_version` = {_q(version)} and tags.`frcnn.split` = {_q(split)} and "
            f"tags.`frcnn.dataset` = {_q(dataset)} and attributes.status = 'FINISHED'")
    runs = client.search_runs(experiments, filt, run_view_type=ViewType.ACTIVE_ONLY, max_results=200,
                              order_by=["attributes.start_time DESC"])
    for run in runs:  # data root and years compared here: paths may hold quotes
        t = run.data.tags
        if data_root is not None and t.get("frcnn.data_root") != data_root:
            continue
        if years is not None and t.get("frcnn.years", "all") != years:
            continue
        return run
    return None


def _describe(name: str, version: str, dataset: str, split: str, data_root: str | None) -> str:
    where = f"{dataset}/{split}" + (f" at {data_root}" if data_root else "")
    return f"models:/{name}/{version} on {where}"


def promote(model: str, alias: str, *, if_better_than: str | None = None, metric: str = "map50",
            split: str = "test", dataset: str = "voc", data_root: str | None = None,
            tracking_uri: str | None = None, client=None, verbose: bool = True) -> PromotionResult:
    """Point ``alias`` at a model version, unconditionally or only when it beats ``if_better_than``."""
    from mlflow.exceptions import MlflowException

    if tracking_uri or client is None:
        import mlflow

        mlflow.set_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    client = _client(client)
    try:
        name, version = parse_version_ref(model, client)
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise PromotionError(f"{model}: no such registered model version ({exc.message})") from exc
    data_root = _shown_root(data_root) if data_root else None
    out = print if verbose else (lambda *a, **k: None)

    def holder(a: str) -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, a).version)
        except MlflowException:
            return None

    previous = holder(alias)
    res = PromotionResult(name, version, alias, False, "")
    if if_better_than:
        res.metric = metric
        cand = latest_evaluation(client, name, version, split=split, dataset=dataset, data_root=data_root)
        if cand is None:
            raise PromotionError(
                f"no FINISHED evaluation run of {_describe(name, version, dataset, split, data_root)}: run "
                f"`frcnn-jobs evaluate --model models:/{name}/{version} --dataset {dataset} --split {split} "
                f"--data-root ...` first")
        if metric not in cand.data.metrics:
            raise PromotionError(f"evaluation run {cand.info.run_id} of models:/{name}/{version} has no metric "
                                 f"{metric!r} (it has {sorted(cand.data.metrics)})")
        res.candidate_value, res.candidate_run_id = float(cand.data.metrics[metric]), cand.info.run_id
        incumbent = holder(if_better_than)
        if incumbent is None:
            res.promoted = True
            res.message = (f"nobody holds @{if_better_than} yet: promoting models:/{name}/{version} "
                           f"({metric}={res.candidate_value:.4f}, run {res.candidate_run_id})")
        else:
            res.incumbent_version = incumbent
            root, years = cand.data.tags.get("frcnn.data_root"), cand.data.tags.get("frcnn.years", "all")
            inc = latest_evaluation(client, name, incumbent, split=split, dataset=dataset, data_root=root,
                                    years=years)
            if inc is None:
                raise PromotionError(
                    f"no FINISHED evaluation run of the @{if_better_than} version "
                    f"{_describe(name, incumbent, dataset, split, root)} (years {years}) to compare with: run "
                    f"`frcnn-jobs evaluate --model models:/{name}/{incumbent} --dataset {dataset} --split {split} "
                    f"--data-root {root}` first")
            if metric not in inc.data.metrics:
                raise PromotionError(f"evaluation run {inc.info.run_id} of models:/{name}/{incumbent} has no "
                                     f"metric {metric!r}")
            res.incumbent_value, res.incumbent_run_id = float(inc.data.metrics[metric]), inc.info.run_id
            compared = (f"{metric} on {dataset}/{split}: candidate models:/{name}/{version} = "
                        f"{res.candidate_value:.4f} (run {res.candidate_run_id}) vs @{if_better_than} "
                        f"models:/{name}/{incumbent} = {res.incumbent_value:.4f} (run {res.incumbent_run_id})")
            out(compared)
            if incumbent == version:
                res.message = f"models:/{name}/{version} already holds @{if_better_than}: nothing to compare"
            elif res.candidate_value > res.incumbent_value:
                res.promoted = True
                res.message = f"{res.candidate_value:.4f} > {res.incumbent_value:.4f}: promoting"
            else:
                res.message = (f"NOT promoted: {res.candidate_value:.4f} is not better than "
                               f"{res.incumbent_value:.4f}; @{alias} stays on "
                               f"{'version ' + previous if previous else 'nobody'}")
    else:
        res.promoted = True
    if res.promoted:
        client.set_registered_model_alias(name, alias, version)
        done = f"models:/{name}@{alias} -> version {version}" + (f" (was {previous})" if previous else "")
        res.message = f"{res.message}; {done}" if res.message else done
    out(res.message, flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# UI
# ---------------------------------------------------------------------------------------------


def ui_command(port: int = 5000, host: str = "127.0.0.1", tracking_uri: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for the resolved tracking store (run by this interpreter)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def ui_url(port: int = 5000, host: str = "127.0.0.1") -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


# ---------------------------------------------------------------------------------------------
# Click commands
# ---------------------------------------------------------------------------------------------


def _click_errors():
    from mlflow.exceptions import MlflowException

    from pipelines.voc import VocLayoutError

    return (EvaluationError, VocLayoutError, FileNotFoundError, MlflowException)


@click.command("evaluate")
@options.MODEL
@click.option("--detections", metavar="FILE", default=None,
              help="Evaluate a detections Parquet (what `infer` writes) instead of running a model.")
@click.option("--dataset", type=click.Choice(DATASETS), default="voc", show_default=True)
@click.option("--data-root", required=True, metavar="PATH", help="VOC data root (local path or URI).")
@click.option("--split", default="test", show_default=True, help="ImageSets/Main/<split>.txt")
@click.option("--year", "years", multiple=True, metavar="YEAR", help="VOC year(s) to join (repeatable). Default: all.")
@options.EXPERIMENT
@options.ADDRESS
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Images per model call.")
@click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True, help="Predictor actors.")
@click.option("--gpus-per-actor", type=click.FloatRange(0), default=0, show_default=True)
@click.option("--cpus-per-actor", type=click.FloatRange(0.1), default=1, show_default=True,
              help="CPUs per actor (also its torch threads on CPU).")
def evaluate_cmd(model_uri, detections, dataset, data_root, split, years, experiment, address, batch_size,
                 concurrency, gpus_per_actor, cpus_per_actor):
    """Evaluate a model (or a detections file) on a split: VOC and COCO AP, tracked as its own MLflow run."""
    if (model_uri is None) == (detections is None):
        raise click.UsageError("give exactly one of --model or --detections")
    try:
        run_evaluation(model_uri, detections, data_root=data_root, split=split, dataset=dataset,
                       years=list(years) or None, experiment=experiment, address=address, batch_size=batch_size,
                       concurrency=concurrency, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor)
    except _click_errors() as exc:
        raise click.ClickException(str(getattr(exc, "message", None) or exc)) from exc


@click.command("promote")
@click.argument("model", metavar="MODEL")
@click.option("--alias", required=True, help="Alias to set, e.g. champion.")
@click.option("--if-better-than", metavar="ALIAS", default=None,
              help="Only if MODEL's latest evaluation beats that of the version holding ALIAS (or nobody holds it).")
@click.option("--metric", default="map50", show_default=True, help="Evaluation metric to compare (higher is better).")
@click.option("--split", default="test", show_default=True)
@click.option("--dataset", type=click.Choice(DATASETS), default="voc", show_default=True)
@click.option("--data-root", metavar="PATH", default=None,
              help="Compare evaluations on this data root. Default: the candidate's latest evaluation's.")
def promote_cmd(model, alias, if_better_than, metric, split, dataset, data_root):
    """Point a registry alias at MODEL (models:/NAME/VERSION or NAME/VERSION).

    A candidate that is not strictly better is reported and exits 0 with the alias unchanged; a
    missing evaluation exits 1."""
    promote(model, alias, if_better_than=if_better_than, metric=metric, split=split, dataset=dataset,
            data_root=data_root)


@click.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui_cmd(port, host):
    """Start the MLflow UI on the tracking store the jobs write to (blocks until stopped)."""
    cmd = ui_command(port, host)
    print(f"MLflow UI at {ui_url(port, host)} (store {cmd[cmd.index('--backend-store-uri') + 1]}); Ctrl-C stops it",
          flush=True)
    try:
        raise SystemExit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


COMMANDS = [evaluate_cmd, promote_cmd, ui_cmd]
