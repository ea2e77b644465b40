"""``frcnn-jobs evaluate``: VOC and COCO AP of a model (or of a detections file) on a split, as its
own MLflow run.

    frcnn-jobs evaluate --model models:/frcnn@champion --dataset voc --data-root data/voc --split test
    frcnn-jobs evaluate --detections out/detections --dataset voc --data-root data/voc --split test

``run_evaluation`` reads the split's ground truth in the model's classes
(``pipelines/groundtruth.py``), predicts through the same Ray Data stages as ``infer``
(``pipelines/predict.py``) or reads a detections path through ``infer``'s reader
(``pipelines/detections.py``: a Parquet file, a folder of parts, or an ``infer`` output's
published partitions), and scores with ``frcnn/report.py`` (VOC all-point ``map50`` and 11-point
``map50_voc07``, per class; COCO AP). No extra score threshold: the model's ``roi.score_thresh``
is the only one.

The run (``tracking.job_run``, named ``evaluate-<model>-<split>``) is tagged with what it
evaluated (``frcnn.job=evaluate``, ``frcnn.dataset``, ``frcnn.split``, ``frcnn.data_root``,
``frcnn.years``, ``frcnn.model_uri``, ``frcnn.model_name``, ``frcnn.model_version``,
``frcnn.train_run_id``), never nested under the training run. Artifacts: ``per_class.csv``,
``pr_curves.png``, ``detections_grid.png``, ``detections.parquet``. A registered version also gets
tags ``map50_<split>``, ``map50_voc07_<split>``, ``coco_map_<split>`` and ``eval_run_<split>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import console, options, tracking
from .eval_detections import EvaluationError, detections_from_file, per_image_detections

log = logging.getLogger(__name__)

GRID_IMAGES = 12
VERSION_TAG_METRICS = ("map50", "map50_voc07", "coco_map")


@dataclass
class EvaluationResult:
    run_id: str
    metrics: dict[str, float]
    per_class: list[dict[str, Any]]  # class, num_gt, num_det, ap_voc, ap_voc07
    model: Any = None  # jobs.models.ModelRef, None for a detections file
    tags: dict[str, str] = field(default_factory=dict)


def predict_split(gt, checkpoint: bytes, data_root: str, *, address: str | None = None, progress: bool = False,
                  **resources: Any) -> tuple[dict, set[str], dict[str, float]]:
    """Run the model over the split through the prediction stages ``infer`` uses (joining or
    starting Ray): ``(detections per image, ids that could not be read, {"images_per_s",
    "inference_s"})``. ``resources``: batch_size, concurrency, cpus_per_actor, gpus_per_actor."""
    from pipelines.predict import PredictorResources, predict_images
    from pipelines.runtime import init_ray
    from pipelines.storage import Location

    init_ray(address, resources.get("concurrency", 1) * resources.get("cpus_per_actor", 1),
             log_to_driver=console.log_to_driver())
    console.quiet_ray()

    source = Location.of(data_root)
    items, errors = [], set()
    for image_id in gt.image_ids:
        path = gt.image_paths.get(image_id)
        if not path:
            errors.add(image_id)
            log.warning("image %s: no image file for this id (JPEGImages/<id>.jpg|.jpeg|.png)", image_id)
            continue
        fs_path = source.path + path[len(source.shown):] if path.startswith(source.shown) else Location.of(path).path
        items.append({"image_id": image_id, "path": path, "fs_path": fs_path})
    t0 = time.perf_counter()
    table = predict_images(items, checkpoint, source=source, progress=progress,
                           resources=PredictorResources(**resources))
    elapsed = time.perf_counter() - t0
    import pyarrow.compute as pc

    bad = pc.not_equal(table.column("error"), "")
    failed = table.filter(bad)
    for row in failed.select(["image_id", "error"]).to_pylist()[:5]:
        log.warning("image %s: %s", row["image_id"], row["error"])
    errors |= set(failed.column("image_id").to_pylist())
    dets = per_image_detections(table.filter(pc.invert(bad)))
    return dets, errors, {"images_per_s": len(items) / max(elapsed, 1e-9), "inference_s": elapsed}


def write_detections(dets: Mapping[str, Mapping[str, Any]], errors: set[str], image_ids: Sequence[str],
                     class_names: Sequence[str], path: str) -> None:
    """``detections.parquet``: what ``--detections`` reads back (the ground truth's labels and names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [i for i in image_ids if i in dets or i in errors]
    empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int32)}
    rows = [dets.get(i, empty) for i in ids]
    pq.write_table(pa.table({
        "image_id": pa.array(ids, pa.string()),
        "boxes": pa.array([np.asarray(r["boxes"], np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "scores": pa.array([np.asarray(r["scores"], np.float32) for r in rows], pa.list_(pa.float32())),
        "labels": pa.array([np.asarray(r["labels"], np.int32) for r in rows], pa.list_(pa.int32())),
        "class_names": pa.array([[class_names[int(x) - 1] for x in r["labels"]] for r in rows], pa.list_(pa.string())),
        "error": pa.array(["unreadable" if i in errors else "" for i in ids], pa.string()),
    }), path)


def draw_grid(gt, dets: Mapping[str, Mapping[str, Any]], errors: set[str], path: str, n: int = GRID_IMAGES) -> bool:
    """``detections_grid.png``: predictions (class colours) and ground truth (dashed green)."""
    from frcnn.images import decode_image
    from frcnn.visualize import draw_detections, image_grid, select_grid_images
    from pipelines.storage import Location

    usable = [i for i in gt.image_ids if gt.image_paths.get(i) and i not in errors]
    tiles = []
    for image_id in select_grid_images(usable, gt.boxes, dets, n):
        try:
            image = decode_image(Location.of(gt.image_paths[image_id]).read_bytes())
        except Exception as exc:  # noqa: BLE001 - a picture is a nicety; skip what cannot be read
            log.warning("grid: cannot read %s: %s", image_id, exc)
            continue
        tiles.append(draw_detections(image, gt.boxes[image_id], dets.get(image_id), gt.class_names))
    if tiles:
        image_grid(tiles, cols=4, cell=256).save(path, format="PNG")
    return bool(tiles)


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


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate: ``model`` or ``detections`` (exactly one) on ``split`` of ``source``.
    ``on_error``: ``fail`` stops at an annotation that cannot be read, ``skip`` leaves its image out
    (counted and logged to the run)."""

    source: Any  # pipelines.datasets.DatasetSource
    split: str = "test"
    model: str | None = None
    detections: str | None = None
    on_error: str = "fail"


@dataclass(frozen=True)
class EvalOptions:
    """Where the run goes and how predictions are made (predictor resources as ``infer``'s)."""

    experiment: str = tracking.DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    address: str | None = None
    batch_size: int = 8
    concurrency: int = 1
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    grid_images: int = GRID_IMAGES
    verbose: bool = True

    def resources(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "concurrency": self.concurrency,
                "gpus_per_actor": self.gpus_per_actor, "cpus_per_actor": self.cpus_per_actor}


@dataclass(frozen=True)
class _Subject:
    """The model (``ref``, checkpoint bytes, config) or the detections file being evaluated."""

    ref: Any = None
    checkpoint: bytes = b""
    cfg: Any = None


def run_evaluation(model: str | None = None, detections: str | None = None, *, data_root: str | None = None,
                   split: str = "test", dataset: str = "voc", years: Sequence[str] | None = None,
                   classes: Sequence[str] | None = None, source: Any = None, on_error: str = "fail",
                   **option_values: Any) -> EvaluationResult:
    """Evaluate a MODEL reference (predicting with Ray Data) or a detections path on a split
    (``source``: a ``DatasetSource``, or ``data_root`` of format ``dataset``; ``classes``: the
    dataset's names); log one MLflow run; return its id, metrics and per-class rows.
    ``option_values``: the fields of :class:`EvalOptions`."""
    from pipelines.datasets import DatasetSource

    if source is None:
        source = DatasetSource(dataset, root=data_root)
    source = dataclasses.replace(source, years=tuple(map(str, years)) if years else source.years,
                                 classes=tuple(classes) if classes else source.classes)
    return evaluate(EvalRequest(source, split, model, detections, on_error), EvalOptions(**option_values))


def evaluate(req: EvalRequest, opts: EvalOptions) -> EvaluationResult:
    """The evaluation as named steps: what is evaluated, the ground truth, the run, the report."""
    from mlflow.tracking import MlflowClient

    if (req.model is None) == (req.detections is None):
        raise EvaluationError("give exactly one of a model (--model) or a detections file (--detections)")
    if req.on_error not in ("fail", "skip"):
        raise EvaluationError(f"on_error must be 'fail' or 'skip', got {req.on_error!r}")
    uri = tracking.setup(opts.tracking_uri, opts.experiment)
    client = MlflowClient(uri)
    subject = _subject(req, client)
    gt = _ground_truth(req, subject)
    counts, made_by, dets, errors = {}, {}, {}, set()
    if req.detections is not None:
        dets, errors, counts, made_by = detections_from_file(req.detections, gt)
    tags, params = _describe(req, opts, subject, gt, counts, made_by)
    name = tracking.evaluate_run_name(subject.ref.uri if subject.ref else made_by.get("model_uri") or "detections",
                                      req.split)
    with tracking.job_run("evaluate", run_name=name, experiment=opts.experiment, tracking_uri=opts.tracking_uri,
                          tags=tags, params=params) as run:
        extra: dict[str, float] = {}
        if subject.ref is not None:
            root = req.source.images or req.source.root or req.source.annotations
            dets, errors, extra = predict_split(gt, subject.checkpoint, root, address=opts.address,
                                                progress=opts.verbose, **opts.resources())
        scores, metrics = _score(gt, dets, errors, counts, extra)
        _log_run(req, opts, gt, dets, errors, scores, metrics)
        if tags.get("frcnn.model_name") and tags.get("frcnn.model_version"):
            _tag_model_version(client, tags["frcnn.model_name"], tags["frcnn.model_version"], req.split, metrics,
                               run.info.run_id)
    if opts.verbose:
        _print_report(req, subject, gt, scores, metrics, errors, run.info.run_id, uri)
    return EvaluationResult(run.info.run_id, metrics, scores.per_class, subject.ref,
                            {k: str(v) for k, v in tags.items() if v})


def _subject(req: EvalRequest, client) -> _Subject:
    from frcnn.inference import load_model

    from .models import resolve_model

    if req.model is None:
        return _Subject()
    ref = resolve_model(req.model, client)  # once: an alias is pinned to its version now
    ckpt = Path(ref.checkpoint).read_bytes()
    return _Subject(ref, ckpt, load_model(ckpt).cfg)


def _ground_truth(req: EvalRequest, subject: _Subject):
    from pipelines.groundtruth import ClassMismatch, GroundTruthError, load_ground_truth

    cfg = subject.cfg
    try:
        gt = load_ground_truth(req.source, req.split, model_classes=cfg.class_names if cfg else None,
                               on_error=req.on_error)
    except (ClassMismatch, GroundTruthError) as exc:
        raise EvaluationError(str(exc)) from exc
    if cfg is not None and cfg.num_classes != len(gt.class_names):
        raise EvaluationError(f"the model predicts {cfg.num_classes} classes but was saved without their names; "
                              f"the dataset has {len(gt.class_names)}: {list(gt.class_names)}")
    return gt


def _describe(req: EvalRequest, opts: EvalOptions, subject: _Subject, gt, counts: dict,
              made_by: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's tags (what it evaluated) and params."""
    years = ",".join(req.source.years) if req.source.years else "all"
    tags: dict[str, Any] = {"frcnn.dataset": req.source.format, "frcnn.split": req.split,
                            "frcnn.data_root": req.source.shown, "frcnn.years": years}
    ref = subject.ref
    if ref is not None:
        tags.update({"frcnn.model_uri": ref.uri, "frcnn.checkpoint": ref.checkpoint, "frcnn.model_name": ref.name,
                     "frcnn.model_version": ref.version, "frcnn.train_run_id": ref.run_id})
    else:
        # Detections written by `infer` name their model: a complete set is that model's evaluation
        # (`promote` finds it like one made with --model); a partial one would under-score it.
        tags["frcnn.detections"] = req.detections
        prefix = "frcnn." if not counts["images_missing"] else "frcnn.detections_"
        if made_by and counts["images_missing"]:
            log.warning("%s: %d split image(s) without a row: not recorded as an evaluation of %s", req.detections,
                        counts["images_missing"], made_by.get("model_uri") or made_by.get("model_sha256"))
        tags.update({f"{prefix}{k}": made_by.get(k) for k in ("model_uri", "model_name", "model_version",
                                                             "train_run_id") if made_by.get(k)})
    params: dict[str, Any] = {"model": req.model, "detections": req.detections, "dataset": req.source.format,
                              "data_root": req.source.shown, "split": req.split, "years": years, "images": len(gt),
                              "classes": ",".join(gt.class_names), "on_error": req.on_error}
    if subject.cfg is not None:
        cfg = subject.cfg
        params.update({**opts.resources(), "address": opts.address, "score_thresh": cfg.roi.score_thresh,
                       "nms_thresh": cfg.roi.nms_thresh, "detections_per_img": cfg.roi.detections_per_img,
                       "canvas": ",".join(f"{h}x{w}" for h, w in cfg.canvas.sizes)})  # the buckets, or one
    return tags, params


def _score(gt, dets: dict, errors: set[str], counts: dict, extra: dict[str, float]):
    """VOC and COCO AP (``frcnn.report``); on a COCO dataset, COCO AP comes from COCOeval on the
    original annotation file (``coco_results.json``, see ``coco_scores``)."""
    from frcnn.report import score_detections

    scores = score_detections(dets, gt.boxes, gt.class_names)
    metrics = {**scores.metrics, "images": float(len(gt)), "images_with_errors": float(len(errors)),
               "images_skipped": float(len(gt.skipped)),
               "num_detections": float(sum(len(d["scores"]) for d in dets.values())),
               "objects_left_out": float(sum(gt.left_out.values())), **extra}
    if "images_missing" in counts:
        metrics["images_missing"] = float(counts["images_missing"])
    return scores, metrics


def coco_scores(gt, dets: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, float]]:
    """A COCO dataset's detections as a results JSON (original image and category ids) and
    COCOeval's numbers for it against the original annotation file (all its images: one left out
    of the split, or unreadable, counts as an image without detections)."""
    import json

    from frcnn.coco import coco_results, evaluate_coco_results
    from pipelines.datasets.coco import load_json
    from pipelines.storage import Location

    instances = load_json(Location.of(gt.source).read_bytes(), gt.source)
    results = coco_results(dets, gt.original_ids, gt.category_ids)
    text = json.dumps(results)  # before scoring: pycocotools' loadRes adds fields to the records
    return text, evaluate_coco_results(instances, results, gt.category_ids)


def _log_run(req: EvalRequest, opts: EvalOptions, gt, dets: dict, errors: set[str], scores,
             metrics: dict[str, float]) -> None:
    """Metrics, the dataset input and the artifacts (per-class CSV, PR curves, grid, detections;
    on a COCO dataset ``coco_results.json``; images left out: ``skipped.json``)."""
    import json

    import mlflow

    from frcnn.report import write_per_class_csv
    from frcnn.visualize import plot_pr_curves

    tmp = tempfile.mkdtemp(prefix="frcnn-eval-")
    try:
        if gt.category_ids:
            results, coco = coco_scores(gt, dets)
            metrics.update({f"coco_{k}": float(v) for k, v in coco.items()})
            Path(tmp, "coco_results.json").write_text(results, encoding="utf-8")
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        tracking.log_dataset(f"{req.source.format}-{req.split}", gt.source, gt.digest, "evaluation")
        if gt.skipped:
            Path(tmp, "skipped.json").write_text(json.dumps(gt.skipped, indent=1), encoding="utf-8")
        write_per_class_csv(scores.per_class, f"{tmp}/per_class.csv")
        plot_pr_curves(scores.voc, f"{tmp}/pr_curves.png")
        draw_grid(gt, dets, errors, f"{tmp}/detections_grid.png", opts.grid_images)
        write_detections(dets, errors, gt.image_ids, gt.class_names, f"{tmp}/detections.parquet")
        mlflow.log_artifacts(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _print_report(req: EvalRequest, subject: _Subject, gt, scores, metrics: dict[str, float], errors: set[str],
                  run_id: str, uri: str) -> None:
    from frcnn.report import format_table

    print(f"evaluation of {subject.ref.label if subject.ref else req.detections} on {req.source.format} "
          f"{req.split} ({len(gt)} images)", flush=True)
    print(format_table(scores.per_class, metrics), flush=True)
    if errors:
        print(f"warning: {len(errors)} image(s) could not be read; counted as images without detections")
    if gt.skipped:
        print(f"warning: {len(gt.skipped)} image(s) left out: their annotation could not be read "
              f"(first: {gt.skipped[0]['source']}: {gt.skipped[0]['reason']}; all in skipped.json)")
    if gt.left_out:
        print(f"note: {sum(gt.left_out.values())} ground-truth object(s) of classes the model does not have "
              f"were left out of the scoring ({', '.join(f'{k} {v}' for k, v in sorted(gt.left_out.items()))})")
    print(f"MLflow evaluation run {run_id} (tracking {uri})", flush=True)


@click.command("evaluate")
@options.MODEL
@click.option("--detections", metavar="PATH", default=None,
              help="Evaluate detections (a Parquet file, a folder of parts, or an `infer` output) instead of a model.")
@options.dataset_options
@click.option("--split", default="test", show_default=True,
              help="voc: ImageSets/Main/<split>.txt; coco: instances_<split>.json; yolo: the data.yaml key.")
@options.YEAR
@options.CLASSES
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at an annotation that cannot be read; skip: leave its image out (counted, "
                   "listed in the run's skipped.json).")
@options.EXPERIMENT
@options.ADDRESS
@options.ACTOR_RESOURCES
@click.pass_context
def evaluate_cmd(ctx, model_uri, detections, dataset, data_root, annotations, images_dir, split, years, class_names,
                 on_error, experiment, address, batch_size, concurrency, gpus_per_actor, cpus_per_actor):
    """Evaluate a model (or detections) on a split: VOC and COCO AP, tracked as its own MLflow run.
    On --dataset coco, COCO AP is pycocotools' COCOeval against the original annotation file, and
    the detections are logged as a COCO results JSON (coco_results.json)."""
    if (model_uri is None) == (detections is None):
        raise click.UsageError("give exactly one of --model or --detections")
    source = options.dataset_source(dataset, data_root, annotations, images_dir, years, class_names)
    req = EvalRequest(source, split, model_uri, detections, on_error)
    try:
        evaluate(req, EvalOptions(experiment=experiment, address=address, batch_size=batch_size,
                                  concurrency=concurrency, gpus_per_actor=gpus_per_actor,
                                  cpus_per_actor=cpus_per_actor))
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the evaluation run is KILLED, no metrics or version tags were recorded; rerun: "
                   + shlex.join(["frcnn-jobs", "evaluate", *(["--model", model_uri] if model_uri else
                                                            ["--detections", detections]),
                                 *(["--dataset", dataset] if dataset != "voc" else []),
                                 *(["--data-root", data_root] if data_root else []),
                                 *(["--annotations", annotations, "--images", images_dir] if annotations else []),
                                 "--split", split]), err=True)
        ctx.exit(console.exit_status())


COMMANDS = [evaluate_cmd]
