"""Scheduled batch inference with Ray Data: images (a folder, an object-store prefix or a Parquet
table) -> detections in Parquet, published one run at a time.

Command line (see ``jobs/infer.py``, which adds the MLflow run and resolves the MODEL)::

    frcnn-jobs infer --model models:/frcnn@champion --input s3://bucket/incoming \\
        --output s3://bucket/detections --incremental --concurrency 4 --gpus-per-actor 1

Python (no MLflow, no ``jobs``: this module never imports it)::

    model = ModelIdentity.of_checkpoint(ckpt_bytes, uri="models:/frcnn@champion", name="frcnn", version="3")
    summary = run_inference("data/incoming", "out/detections", ckpt_bytes, model, incremental=True)
    table = read_published("out/detections")        # every published partition, nothing else

One streaming pass: the inputs (``pipelines/inputs.py``) -> the prediction stages shared with
``evaluate`` (``pipelines/predict.py``: predictors reading, decoding and running the model) ->
``write_part`` tasks writing Parquet into the run's staging folder and returning one row of
counts (``pipelines/detections.py``, which also holds the layout and its reader). The driver
consumes only the counts and prints a progress line about every 10 s.

Publishing goes through ``pipelines.storage.publish``: staging renamed to ``<output>/run=<run>``
with ``_SUCCESS`` inside (locally), or copied there with ``_SUCCESS`` written last (object
stores). A failed or interrupted run deletes its staging and publishes nothing; a killed run
leaves staging (and, on an object store, perhaps an unmarked partition) that the next run
deletes. Readers ignore a partition without ``_SUCCESS``.

Incremental runs: an input is skipped when a published partition holds a row for its
``image_id`` made by the same model (same ``model_name``/``model_version`` when registered, else
the same ``model_sha256``). Error rows are not in the ledger: an unreadable input is retried by
the next run. Two runs that overlap in time may both process the same new inputs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.detections import ERRORS, RUN_PREFIX, SUCCESS, published_ids, published_runs, read_published, write_part
from pipelines.inputs import Inputs, list_inputs, table_images
from pipelines.predict import PredictorResources, file_items, predict_dataset
from pipelines.storage import (
    Location,
    clean_stale_staging,
    is_published,
    new_run_name,
    publish,
    run_time,
    staging_location,
)

__all__ = ["InferSummary", "ModelIdentity", "list_inputs", "published_ids", "published_runs", "read_published",
           "run_inference"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
_MAX_FAILURES_IN_SUMMARY = 100


@dataclass(frozen=True)
class ModelIdentity:
    """What made the detections: recorded in every row, the ledger key of incremental runs."""

    uri: str  # the MODEL reference as given (an alias stays an alias: the version pins it)
    sha256: str  # the checkpoint file's digest
    name: str | None = None  # registered model name and version, when it is one
    version: str | None = None
    train_run_id: str | None = None

    @classmethod
    def of_checkpoint(cls, checkpoint: bytes, uri: str, name: str | None = None, version: str | None = None,
                      train_run_id: str | None = None) -> ModelIdentity:
        return cls(uri=uri, sha256=hashlib.sha256(checkpoint).hexdigest(), name=name,
                   version=None if version is None else str(version), train_run_id=train_run_id)

    @property
    def registered(self) -> bool:
        return bool(self.name and self.version)

    @property
    def key(self) -> str:
        """``name/version`` for a registered model, else ``sha256:<digest>``."""
        return f"{self.name}/{self.version}" if self.registered else f"sha256:{self.sha256}"

    def columns(self) -> dict[str, str | None]:
        return {"model_name": self.name, "model_version": self.version, "model_uri": self.uri,
                "model_sha256": self.sha256}


@dataclass
class InferSummary:
    run: str  # the partition's run name (<UTC timestamp>-<uuid8>)
    partition: str  # where it was published (path or URI)
    infer_run_id: str
    model: dict[str, Any]
    input: str
    input_kind: str  # "files" | "table"
    incremental: bool
    seen: int  # inputs listed
    new: int  # inputs processed by this run
    skipped: int  # already processed by this model (incremental)
    failed: int  # unreadable inputs (error table)
    written: int  # detection rows written
    detections: int
    seconds: float
    images_per_s: float
    started_at: str
    finished_at: str
    parts: list[str] = field(default_factory=list)
    error_parts: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # the first 100: image_id, path, reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"infer: {self.seen} inputs seen, {self.new} new, {self.skipped} skipped (already done by "
            f"{self.model.get('key')}), {self.failed} failed; {self.written} images written, "
            f"{self.detections} detections, {self.images_per_s:.1f} images/s ({self.seconds:.1f} s)",
            f"  partition: {self.partition}",
        ]
        lines += [f"  failed {r['path']}: {r['reason']}" for r in self.failures[:20]]
        if self.failed > 20:
            lines.append(f"  ... {self.failed - 20} more in {self.partition}/{ERRORS}/")
        return "\n".join(lines)


def _clean_stale(out: Location, run: str) -> None:
    """What killed runs left: their staging folders, and (object stores) unmarked partitions."""
    clean_stale_staging(out.child(RUN_PREFIX + run), run, any_dest=True)
    for name in out.list_dirs():
        if (name.startswith(RUN_PREFIX) and run_time(name[len(RUN_PREFIX):]) < run_time(run)
                and not is_published(out.child(name), SUCCESS)):
            out.child(name).delete()
            log.warning("%s: unpublished partition left by an interrupted run; deleted", out.child(name).shown)


def run_inference(input_uri: str | Location, output_uri: str | Location, checkpoint: bytes,
                  model: ModelIdentity | None = None, *, incremental: bool = False, concurrency: int = 1,
                  gpus_per_actor: float = 0, cpus_per_actor: float = 1, batch_size: int = 8,
                  score_threshold: float | None = None, rows_per_file: int = 256, infer_run_id: str | None = None,
                  run_name: str | None = None, progress: bool = True) -> InferSummary:
    """Detect objects in every input image (or only the new ones) and publish one partition.

    ``checkpoint``: the checkpoint file's bytes (``frcnn.training.checkpoint_state`` saved with
    ``torch.save``). ``model``: its identity (default: unregistered, keyed by the bytes' sha256).
    ``infer_run_id`` is written into every row (the MLflow run id; default: the run name).
    ``progress``: print a line about every 10 s and the summary. Uses the running Ray instance, or
    starts a local one. Raises on any failure (and on Ctrl-C) after deleting its staging folder;
    nothing is published then.
    """
    import ray

    if int(batch_size) < 1 or int(concurrency) < 1 or int(rows_per_file) < 1:
        raise ValueError("batch_size, concurrency and rows_per_file must be >= 1")
    checkpoint = bytes(checkpoint)
    model = model or ModelIdentity.of_checkpoint(checkpoint, uri="<bytes>")
    run = run_name or new_run_name()
    infer_run_id = infer_run_id or run
    started = _dt.datetime.now(_dt.UTC)
    t0 = time.perf_counter()

    out = Location.of(output_uri)
    if out.is_file():
        raise FileExistsError(f"{out.shown}: is a file, not an output folder")
    inputs = list_inputs(input_uri)  # before anything is written: a bad input costs nothing
    out.create_dir()
    _clean_stale(out, run)

    done = published_ids(out, model) if incremental else set()
    todo = [it for it in inputs.items if it["image_id"] not in done]
    partition = out.child(RUN_PREFIX + run)
    staging = staging_location(partition, run)
    meta = {**model.columns(), "train_run_id": model.train_run_id, "infer_run_id": infer_run_id}
    counts = {"rows": 0, "errors": 0, "detections": 0}
    failures: list[dict[str, str]] = []
    staging.create_dir()
    try:
        t_pipe = time.perf_counter()
        if todo:
            if not ray.is_initialized():
                ray.init(include_dashboard=False)
            resources = PredictorResources(batch_size=batch_size, concurrency=concurrency,
                                           cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
            ds = _dataset(inputs, todo, incremental, checkpoint, resources=resources,
                          score_threshold=score_threshold, digest=model.sha256)
            ds = ds.map_batches(write_part, batch_size=int(rows_per_file), batch_format="pyarrow", num_cpus=0.25,
                                fn_kwargs={"staging": staging, "meta": meta})
            _consume(ds, counts, failures, len(todo), progress)
        seconds = time.perf_counter() - t_pipe
        parts = [n for n in staging.list_files(".parquet")]
        error_parts = [f"{ERRORS}/{n}" for n in staging.child(ERRORS).list_files(".parquet")]
        staged = (_rows(staging, parts), _rows(staging, error_parts))
        if staged != (counts["rows"], counts["errors"]):
            raise RuntimeError(f"{staging.shown}: holds {staged[0]} detection rows and {staged[1]} error rows, the "
                               f"run wrote {counts['rows']} and {counts['errors']}; nothing published")
        if counts["rows"] + counts["errors"] != len(todo):
            raise RuntimeError(f"{len(todo)} inputs to process, {counts['rows'] + counts['errors']} rows came back; "
                               "nothing published")
        summary = InferSummary(
            run=run, partition=partition.shown, infer_run_id=infer_run_id, model={**asdict(model), "key": model.key},
            input=inputs.root.shown, input_kind=inputs.kind, incremental=bool(incremental), seen=len(inputs.items),
            new=len(todo), skipped=len(inputs.items) - len(todo), failed=counts["errors"], written=counts["rows"],
            detections=counts["detections"], seconds=round(time.perf_counter() - t0, 3),
            images_per_s=len(todo) / seconds if seconds > 0 and todo else 0.0,
            started_at=started.isoformat(timespec="seconds"),
            finished_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            parts=parts, error_parts=error_parts, failures=failures)
        publish(staging, partition, SUCCESS, summary.to_dict())
    except BaseException:
        try:
            staging.delete()
        except Exception as exc:  # noqa: BLE001 - the next run deletes it anyway; keep the real error
            log.warning("%s: could not delete staging (%s); the next run will", staging.shown, exc)
        raise
    if progress:
        print(summary, flush=True)
    return summary


def _consume(ds: Any, counts: dict[str, int], failures: list, total: int, progress: bool) -> None:
    """Pull the count rows; a progress line about every ``PROGRESS_EVERY_S``. Closing the iterator
    early (an error, Ctrl-C) shuts the executor down, so no task writes into staging afterwards."""
    t0 = last = time.perf_counter()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in batches:
            for row in batch.to_pylist():
                for k in counts:
                    counts[k] += int(row[k])
                room = _MAX_FAILURES_IN_SUMMARY - len(failures)
                failures.extend(row["failures"][:max(room, 0)])
            now = time.perf_counter()
            if progress and now - last >= PROGRESS_EVERY_S:
                last = now
                n = counts["rows"] + counts["errors"]
                rate = n / (now - t0)
                left = f", about {math.ceil((total - n) / rate)} s left" if rate > 0 else ""
                print(f"infer {now - t0:.0f}s: {n}/{total} images, {rate:.1f} images/s{left}", flush=True)
    finally:
        getattr(batches, "close", lambda: None)()


def _rows(folder: Location, names: list[str]) -> int:
    import pyarrow.parquet as pq

    total = 0
    for name in names:
        with folder.fs.open_input_file(folder.child(name).path) as f:
            total += pq.read_metadata(f).num_rows
    return total


def _dataset(inputs: Inputs, todo: list[dict[str, str]], incremental: bool, checkpoint: bytes, *,
             resources: PredictorResources, score_threshold: float | None, digest: str):
    import ray

    if inputs.kind == "files":
        ds = file_items([{k: it[k] for k in ("image_id", "fs_path", "path")} for it in todo], resources.batch_size)
        source: Location | None = inputs.root
    else:
        keep = frozenset(it["image_id"] for it in todo) if incremental else None
        ds = ray.data.read_parquet(inputs.table_files, filesystem=inputs.root.fs)
        ds = ds.map_batches(table_images, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"id_column": inputs.id_column, "keep": keep})
        source = None
    return predict_dataset(ds, checkpoint, source=source, resources=resources, score_threshold=score_threshold,
                           digest=digest)
