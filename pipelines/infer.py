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
stores). A failed or interrupted run deletes its staging and publishes nothing. Readers ignore a
partition without ``_SUCCESS``.

One run at a time per output: a run first takes the output's lease
(``<output>/_staging/output.lease``, ``pipelines/lease.py``) and is refused
(``pipelines.lease.LeaseHeld``, naming the holder) while another run holds it, or waits up to
``wait`` seconds. Holding it, the run deletes what dead runs left (staging folders, and on an
object store unmarked partitions) and never anything of a live one.

Incremental runs: an input is skipped when a published partition holds a row for its
``image_id`` made by the same model (same ``model_name``/``model_version`` when registered, else
the same ``model_sha256``). Error rows are not in the ledger: an unreadable input is retried by
the next run. Exactly once: just before publishing, a run that sees partitions published since
it listed the output checks them for its own inputs, and fails (:class:`AlreadyPublished`,
nothing published) if any holds one for the same model; with the lease this happens only to a run
that stalled past the lease's time-to-live and lost it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from frcnn.errors import JobError
from pipelines.detections import ERRORS, RUN_PREFIX, SUCCESS, published_ids, published_runs, read_published, write_part
from pipelines.inputs import Inputs, list_inputs, table_images
from pipelines.lease import LEASE_SUFFIX, Claim, claim, live_runs
from pipelines.predict import PredictorResources, file_items, predict_dataset
from pipelines.storage import (
    STAGING_DIR,
    Location,
    discard,
    is_published,
    new_run_name,
    publish,
    run_time,
    staging_location,
)

__all__ = ["AlreadyPublished", "InferOptions", "InferSummary", "ModelIdentity", "list_inputs",
           "published_ids", "published_runs", "read_published", "run_inference"]

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


class AlreadyPublished(JobError, RuntimeError):
    """Another run published rows for some of this run's inputs after it listed them."""


@dataclass(frozen=True)
class InferOptions:
    """How a run processes its inputs (see :func:`run_inference`)."""

    incremental: bool = False
    concurrency: int = 1
    gpus_per_actor: float = 0
    cpus_per_actor: float = 1
    batch_size: int = 8
    score_threshold: float | None = None
    rows_per_file: int = 256
    wait: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.batch_size, self.concurrency, self.rows_per_file) < 1:
            raise ValueError("batch_size, concurrency and rows_per_file must be >= 1")

    @classmethod
    def given(cls, options: InferOptions | None, fields: dict[str, Any]) -> InferOptions:
        """``options``, or one made of its ``fields`` (the keyword form of the run functions)."""
        if options is not None and fields:
            raise TypeError("pass options or its fields as keywords, not both")
        return options or cls(**fields)

    @property
    def resources(self) -> PredictorResources:
        return PredictorResources(batch_size=self.batch_size, concurrency=self.concurrency,
                                  cpus_per_actor=self.cpus_per_actor, gpus_per_actor=self.gpus_per_actor)


@dataclass(frozen=True)
class _Plan:
    """One run: where it writes, what it does, what the output held when it listed it."""

    run: str
    out: Location
    inputs: Inputs
    todo: list[dict[str, str]]
    listed_runs: tuple[str, ...]
    partition: Location
    staging: Location
    meta: dict[str, Any]
    started: _dt.datetime


def output_lease(out: Location) -> Location:
    """Where the lease of an infer output lives: inside it, beside the runs' staging folders."""
    return out.child(STAGING_DIR, "output" + LEASE_SUFFIX)


def _claim_output(out: Location, run: str, wait: float) -> Claim:
    """The output's lease (refused with :class:`LeaseHeld` while another run holds it), then what
    dead runs left: their staging folders, and (object stores) unmarked partitions."""
    held = claim(out.child(RUN_PREFIX + run), run, wait=wait, lease_at=output_lease(out), any_dest=True,
                 where=out.shown)
    live = live_runs(out.child(STAGING_DIR)) | {run}
    for name in out.list_dirs():
        other = name[len(RUN_PREFIX):]
        if (name.startswith(RUN_PREFIX) and other not in live and run_time(other) < run_time(run)
                and not is_published(out.child(name), SUCCESS)):
            out.child(name).delete()
            log.warning("%s: unpublished partition left by an interrupted run; deleted", out.child(name).shown)
    return held


def run_inference(input_uri: str | Location, output_uri: str | Location, checkpoint: bytes,
                  model: ModelIdentity | None = None, options: InferOptions | None = None, *,
                  infer_run_id: str | None = None, run_name: str | None = None, **option_fields: Any) -> InferSummary:
    """Detect objects in every input image (or only the new ones) and publish one partition.

    ``checkpoint``: the checkpoint file's bytes (``frcnn.training.checkpoint_state`` saved with
    ``torch.save``). ``model``: its identity (default: unregistered, keyed by the bytes' sha256).
    ``options``: an :class:`InferOptions`, or its fields as keywords (``incremental=True,
    batch_size=4``). ``infer_run_id`` is written into every row (the MLflow run id; default: the
    run name). With ``progress`` it prints a line about every 10 s and the summary; ``wait`` is how
    long to wait for a run that holds the output (else :class:`~pipelines.lease.LeaseHeld` at
    once). Uses the running Ray instance, or starts a local one. Raises on any failure (and on
    Ctrl-C or SIGTERM) after deleting its staging folder; nothing is published then.
    """
    opts = InferOptions.given(options, option_fields)
    checkpoint = bytes(checkpoint)
    model = model or ModelIdentity.of_checkpoint(checkpoint, uri="<bytes>")
    run = run_name or new_run_name()
    out = Location.of(output_uri)
    if out.is_file():
        raise FileExistsError(f"{out.shown}: is a file, not an output folder")
    inputs = list_inputs(input_uri)  # before anything is written: a bad input costs nothing
    out.create_dir()
    t0 = time.perf_counter()
    held = _claim_output(out, run, opts.wait)
    try:
        plan = _plan(run, out, inputs, model, opts, infer_run_id or run)
        counts, failures, seconds = _process(plan, checkpoint, model, opts)
        summary = _summary(plan, model, opts, counts, failures, seconds, time.perf_counter() - t0)
        _commit(plan, model, summary)
    except BaseException:
        discard(held.staging)  # ends the claim too
        raise
    if opts.progress:
        print(summary, flush=True)
    return summary


def _plan(run: str, out: Location, inputs: Inputs, model: ModelIdentity, opts: InferOptions,
          infer_run_id: str) -> _Plan:
    """What to process: every input, or (incremental) those without a published row by ``model``."""
    listed = tuple(published_runs(out))
    done = published_ids(out, model) if opts.incremental else set()
    partition = out.child(RUN_PREFIX + run)
    return _Plan(run=run, out=out, inputs=inputs, todo=[it for it in inputs.items if it["image_id"] not in done],
                 listed_runs=listed, partition=partition, staging=staging_location(partition, run),
                 meta={**model.columns(), "train_run_id": model.train_run_id, "infer_run_id": infer_run_id},
                 started=_dt.datetime.now(_dt.UTC))


def _process(plan: _Plan, checkpoint: bytes, model: ModelIdentity,
             opts: InferOptions) -> tuple[dict[str, int], list[dict[str, str]], float]:
    """Predict and write the parts into staging; check that staging holds what came back."""
    import ray

    counts = {"rows": 0, "errors": 0, "detections": 0}
    failures: list[dict[str, str]] = []
    plan.staging.create_dir()
    t0 = time.perf_counter()
    if plan.todo:
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        ds = _dataset(plan.inputs, plan.todo, checkpoint, opts, digest=model.sha256)
        ds = ds.map_batches(write_part, batch_size=opts.rows_per_file, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"staging": plan.staging, "meta": plan.meta})
        _consume(ds, counts, failures, len(plan.todo), opts.progress)
    seconds = time.perf_counter() - t0
    staged = (_rows(plan.staging, plan.staging.list_files(".parquet")),
              _rows(plan.staging.child(ERRORS), plan.staging.child(ERRORS).list_files(".parquet")))
    if staged != (counts["rows"], counts["errors"]):
        raise RuntimeError(f"{plan.staging.shown}: holds {staged[0]} detection rows and {staged[1]} error rows, the "
                           f"run wrote {counts['rows']} and {counts['errors']}; nothing published")
    if counts["rows"] + counts["errors"] != len(plan.todo):
        raise RuntimeError(f"{len(plan.todo)} inputs to process, {counts['rows'] + counts['errors']} rows came "
                           "back; nothing published")
    return counts, failures, seconds


def _summary(plan: _Plan, model: ModelIdentity, opts: InferOptions, counts: dict[str, int],
             failures: list[dict[str, str]], seconds: float, total_seconds: float) -> InferSummary:
    n, seen = len(plan.todo), len(plan.inputs.items)
    return InferSummary(
        run=plan.run, partition=plan.partition.shown, infer_run_id=plan.meta["infer_run_id"],
        model={**asdict(model), "key": model.key}, input=plan.inputs.root.shown, input_kind=plan.inputs.kind,
        incremental=opts.incremental, seen=seen, new=n, skipped=seen - n, failed=counts["errors"],
        written=counts["rows"], detections=counts["detections"], seconds=round(total_seconds, 3),
        images_per_s=n / seconds if seconds > 0 and n else 0.0, started_at=plan.started.isoformat(timespec="seconds"),
        finished_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        parts=plan.staging.list_files(".parquet"),
        error_parts=[f"{ERRORS}/{n}" for n in plan.staging.child(ERRORS).list_files(".parquet")], failures=failures)


def _commit(plan: _Plan, model: ModelIdentity, summary: InferSummary) -> None:
    """Publish, unless a run published rows for some of these inputs by the same model since they
    were listed (possible only when this run's lease was lost): then fail, publishing nothing, and
    let the next incremental run do what is left."""
    if plan.todo and tuple(published_runs(plan.out)) != plan.listed_runs:
        mine = {it["image_id"] for it in plan.todo}
        overlap = mine & published_ids(plan.out, model)
        if overlap:
            raise AlreadyPublished(
                f"{plan.out.shown}: another run published {len(overlap)} of this run's {len(mine)} inputs for "
                f"{model.key} while it ran; nothing published (rerun with --incremental for what is left)")
    publish(plan.staging, plan.partition, SUCCESS, summary.to_dict())


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


def _dataset(inputs: Inputs, todo: list[dict[str, str]], checkpoint: bytes, opts: InferOptions, *, digest: str):
    import ray

    if inputs.kind == "files":
        ds = file_items([{k: it[k] for k in ("image_id", "fs_path", "path")} for it in todo], opts.batch_size)
        source: Location | None = inputs.root
    else:
        keep = frozenset(it["image_id"] for it in todo) if opts.incremental else None
        ds = ray.data.read_parquet(inputs.table_files, filesystem=inputs.root.fs)
        ds = ds.map_batches(table_images, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"id_column": inputs.id_column, "keep": keep})
        source = None
    return predict_dataset(ds, checkpoint, source=source, resources=opts.resources,
                           score_threshold=opts.score_threshold, digest=digest)
