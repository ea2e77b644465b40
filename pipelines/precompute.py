"""Ray Data precompute job: VOC split -> canvas JPEGs + RPN anchor targets in Parquet shards.

Command line (see ``jobs/data_cmds.py``)::

    frcnn-jobs precompute --dataset voc --data-root /data/voc --split trainval \\
        --out /data/precomputed/voc07-trainval [--year 2007] [--config vgg16_voc] [--classes a,b,c]

Python::

    summary = precompute("/data/voc", "trainval", "/data/pre/trainval", cfg)
    ds, manifest = open_precomputed("/data/pre/trainval", cfg)     # what training reads

The modules
-----------
``pipelines.precompute_rows``: one image -> one row (read, parse, decode, canvas, anchor targets,
encode). ``pipelines.precompute_job``: the Ray Data map over a block, the problem ledger, the
progress lines. This module: the run (checks, classes, the pipeline, the manifest, publishing) and
``open_precomputed``. Memory does not grow with the dataset: a task holds a few rows at a time,
the driver holds the split list (paths) and the problem records.

Classes
-------
The model config's class names are the truth when set; the dataset's classes are ``classes``
(``--classes``), else ``classes.txt`` in the year folder(s), else VOC's 20. Objects of a dataset
class the model does not have are left out and counted (``manifest["left_out"]``, per class);
a model class the dataset does not have is refused before any work. Labels are ``1..C`` in the
model's class order.

What is a problem
-----------------
Skipped images (``manifest["skipped"]``): corrupt or truncated image, annotation that does not
parse or declares entities (billion laughs), split entry with no annotation or no image file, and
(``drop_empty`` only) images with no target box. Warnings (``manifest["warnings"]``, the image
is still written): objects dropped (missing ``<bndbox>``, inverted or zero-area box, unknown class,
box wholly outside the image) or clipped to the image, annotation size that disagrees with the
image, and images with no target box, which are kept as all-negative examples unless
``drop_empty``. ``on_error="fail"`` stops at the first skipped image or dropped/clipped object; an
image that simply has no objects is a valid negative and never fails the run.

Publishing
----------
``pipelines.storage``'s staged publish: the shards are written into
``<parent>/_staging/<out name>.<run>``, then published to ``out`` with ``_frcnn_manifest.json``
as the marker, written last (renamed into place locally; copied, manifest last, on object
stores). Readers (``open_precomputed``) require the manifest. A failed or interrupted (Ctrl-C) run
deletes its staging; a killed one (``kill -9``) leaves it, and the next run of the same ``out``
deletes it with a warning.

Output
------
Quiet by default: no Ray Data progress bars or per-operator log lines; with ``progress`` the run
prints its own progress lines (``Progress``) and a summary. Debug logging (``frcnn-jobs -v``)
brings Ray Data's own output back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from frcnn.config import ModelConfig
from frcnn.errors import DatasetError
from pipelines import lease, runtime, schema, storage
from pipelines.datasets import DatasetSource, items_digest, open_split
from pipelines.precompute_job import PrecomputeError, Progress, get_ledger, precompute_block
from pipelines.precompute_rows import process_item, rows_to_table
from pipelines.storage import Location

__all__ = [
    "PrecomputeError",
    "PrecomputeOptions",
    "PrecomputeSummary",
    "check_output",
    "model_classes",
    "open_precomputed",
    "precompute",
    "process_item",
    "rows_to_table",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BLOCKS_PER_CPU = 4  # short last blocks: the slowest task sets the wall time
_MIN_SHARD_ROWS = 8


@dataclass
class PrecomputeSummary:
    out: str
    rows: int
    shards: list[str]
    skipped: list[dict[str, str]]
    warnings: list[dict[str, str]]
    positives_per_image: float
    seconds: float
    images_per_s: float
    manifest: dict[str, Any] = field(repr=False)
    left_out: dict[str, int] = field(default_factory=dict)
    coverage: Any = field(default=None, repr=False)  # frcnn.anchor_coverage.CoverageStats of the written rows

    def __str__(self) -> str:
        left = sum(self.left_out.values())
        return (f"precompute: {self.rows} images written in {len(self.shards)} shard(s), "
                f"{len(self.skipped)} skipped, {len(self.warnings)} warning(s), "
                + (f"{left} object(s) of classes the model does not have left out, " if left else "")
                + f"{self.positives_per_image:.1f} positive anchors/image, "
                f"{self.images_per_s:.1f} images/s ({self.seconds:.1f} s) -> {self.out}")


def check_output(out: str, overwrite: bool) -> Location:
    """Refuse an existing ``out`` unless ``overwrite`` (called before any work is done)."""
    loc = Location.of(out)
    if loc.is_file():
        raise FileExistsError(f"{out}: exists and is a file, not a precompute output folder")
    if loc.is_dir() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    return loc


def model_classes(cfg: ModelConfig, dataset_classes: Sequence[str], dataset: str) -> tuple[str, ...]:
    """The model's class names (the config's when set, else the dataset's), checked against the
    dataset's: every model class must be one of them (``DatasetError`` naming those that are not)."""
    names = tuple(cfg.class_names) if cfg.class_names else tuple(dataset_classes)
    if len(names) != cfg.num_classes:
        raise DatasetError(f"{len(names)} class names {list(names)} for a model config with "
                           f"num_classes={cfg.num_classes}")
    missing = [n for n in names if n not in set(dataset_classes)]
    if missing:
        raise DatasetError(f"model class(es) {', '.join(map(repr, missing))} not in the dataset {dataset} "
                           f"(its classes: {', '.join(dataset_classes)}); pass --classes if its list differs")
    return names


def _package_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("frcnn-jobs")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


@contextlib.contextmanager
def _ray_data_output(detail: bool):
    """Ray Data's progress bars and per-operator log lines only with ``detail``; restored after.

    Without ``detail`` Ray Data's error tracebacks stay out of the console too (they still reach
    its ``ray-data.log`` file): a failed run ends with one line naming the file and the reason,
    raised here, and ``-v`` shows Ray Data's trace.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats)
    loggers = [logging.getLogger(n) for n in ("ray.data", "ray.data._internal")]
    levels = [lg.level for lg in loggers]
    consoles = [h for lg in loggers for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = detail
    if not detail:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        for h in consoles:
            h.addFilter(_below_error)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = saved
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for h in consoles:
            h.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class PrecomputeOptions:
    """How a split is precomputed (the defaults are the CLI's).

    ``on_error``: ``"skip"`` reports problems in the manifest and goes on, ``"fail"`` raises
    :class:`PrecomputeError` ``"<file>: <reason>"`` at the first one and publishes nothing.
    ``overwrite``: replace an existing ``out`` once the new output is complete (else refused before
    any work). ``rows_per_shard``: at most this many rows per Parquet file (one task per shard).
    ``progress``: progress lines while running and a summary at the end."""

    on_error: str = "skip"
    overwrite: bool = False
    use_difficult: bool = False
    drop_empty: bool = False
    rows_per_shard: int = 256
    jpeg_quality: int = 95
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
        if int(self.rows_per_shard) < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def as_source(data: str | DatasetSource, years: Sequence[str] | str | None = None,
              classes: Sequence[str] | None = None) -> DatasetSource:
    """A data root (VOC) or a :class:`DatasetSource`, with ``years``/``classes`` applied."""
    if isinstance(years, str):
        years = [y for y in years.split(",") if y.strip()]
    if isinstance(data, DatasetSource):
        return dataclasses.replace(data, years=tuple(years) if years else data.years,
                                   classes=tuple(classes) if classes else data.classes)
    return DatasetSource("voc", root=str(data), years=tuple(years) if years else None,
                         classes=tuple(classes) if classes else None)


@dataclass(frozen=True)
class _Plan:
    """What the run works on, fixed before any work: the split's items and the spec tasks get."""

    source: DatasetSource
    split: str
    reader: Any  # pipelines.datasets.base.Reader
    items: list
    names: tuple[str, ...]
    spec: dict[str, Any]


def precompute(data: str | DatasetSource, split: str, out: str, cfg: ModelConfig,
               options: PrecomputeOptions | None = None, *, years: Sequence[str] | None = None,
               classes: Sequence[str] | None = None, **option_values: Any) -> PrecomputeSummary:
    """Precompute canvas images and RPN anchor targets of one split into Parquet shards.

    CLI: ``frcnn-jobs precompute --dataset voc --data-root DATA --split trainval --out OUT``.

    ``data``: a VOC data root, or a :class:`~pipelines.datasets.DatasetSource` (voc, coco, yolo);
    local paths or URIs (``s3://``, ``gs://``...), as ``out``. ``classes``: the dataset's class
    names when its own list is not to be used; the model's are ``cfg.class_names`` when set (see
    the module docstring). ``options`` (or its fields as keywords): :class:`PrecomputeOptions`.
    Uses the running Ray instance, or starts a local one.
    """
    opts = options or PrecomputeOptions(**option_values)
    dest = check_output(out, opts.overwrite)  # refuse before any work
    plan = _plan(as_source(data, years, classes), split, cfg, opts)
    run = storage.new_run_name()
    staging = storage.staging_location(dest, run)
    runtime.init_ray()
    t0 = time.perf_counter()
    manifest, coverage, coverage_warning = _run_and_publish(plan, cfg, opts, dest, staging, run, t0)
    seconds = time.perf_counter() - t0
    summary = PrecomputeSummary(
        out=dest.shown, rows=manifest["rows"], shards=manifest["shards"], skipped=manifest["skipped"],
        warnings=manifest["warnings"], positives_per_image=manifest["positives_per_image"], seconds=seconds,
        images_per_s=len(plan.items) / seconds, manifest=manifest, left_out=manifest["left_out"], coverage=coverage)
    if coverage_warning:
        log.warning("%s", coverage_warning)
    if opts.progress:
        _print_summary(summary)
    return summary


def _plan(source: DatasetSource, split: str, cfg: ModelConfig, opts: PrecomputeOptions) -> _Plan:
    reader = open_split(source, split)
    names = model_classes(cfg, reader.classes, source.shown)
    items = reader.items()
    if not items:
        raise DatasetError(f"{source.shown}: split {split!r} is empty")
    if reader.problems and opts.on_error == "fail":
        first = reader.problems[0]
        raise PrecomputeError(f"{first['source']}: image {first['image_id']}: {first['reason']}",
                              first["source"], first["reason"])
    root = source.root or source.images or source.annotations
    spec = {
        "cfg": cfg.to_dict(),
        "class_names": list(names),
        "dataset_classes": list(reader.classes),
        "use_difficult": opts.use_difficult,
        "drop_empty": opts.drop_empty,
        "jpeg_quality": int(opts.jpeg_quality),
        "data_root": str(root),
        "root_shown": storage.shown(root),
    }
    return _Plan(source, split, reader, items, names, spec)


def _shard_rows(n_items: int, rows_per_shard: int) -> int:
    """One input block per shard: the map fuses with the write, so one task reads, processes and
    writes one shard. A few blocks per CPU, so that no CPU idles behind a long last one."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(int(rows_per_shard), max(_MIN_SHARD_ROWS, math.ceil(n_items / (_BLOCKS_PER_CPU * cpus)))))


def _run_and_publish(plan: _Plan, cfg: ModelConfig, opts: PrecomputeOptions, dest: Location,
                     staging: Location, run: str, t0: float):
    """Write the shards into ``staging``, then publish them with their manifest (and the anchor
    coverage): ``(manifest, coverage, coverage warning)``. On any failure
    (Ctrl-C included) the staging folder is deleted and nothing is published."""
    ledger = get_ledger()
    collected = False
    try:
        lease.claim(dest, run)  # refused while a live run writes dest; cleans what dead runs left
        staging.create_dir()
        shard_rows = _shard_rows(len(plan.items), opts.rows_per_shard)
        try:
            _write_shards(plan, staging, shard_rows, ledger, run, opts)
        except Exception as exc:  # noqa: BLE001 - Ray wraps a task's error: turned into one line here
            collected = True
            err = _write_error(exc, _collect(ledger, run)["first_fatal"], dest, plan)
            raise err from err.__cause__
        collected = True
        result = _collect(ledger, run)
        manifest = _manifest(staging, result, plan, cfg, opts, seconds=time.perf_counter() - t0)
        coverage, coverage_warning = anchor_coverage(result["coverage"], cfg)
        manifest["anchor_coverage"] = {**coverage.metrics(), "warning": coverage_warning}
        storage.publish(staging, dest, schema.MANIFEST_NAME, manifest, replace=opts.overwrite)
        return manifest, coverage, coverage_warning
    except BaseException as exc:
        if not collected:
            ledger.finish.remote(run)  # drop whatever the run reported
        if isinstance(exc, KeyboardInterrupt):
            runtime.stop_local_ray()  # no write task may outlive the staging folder it writes into
        storage.discard(staging)
        if opts.progress and isinstance(exc, KeyboardInterrupt):
            print(f"precompute interrupted: nothing published to {dest.shown}"
                  + (" (the existing output is unchanged)" if dest.exists() else ""), flush=True)
        raise


def _collect(ledger, run: str) -> dict[str, Any]:
    """The run's records from the ledger (which forgets the run)."""
    import ray

    return ray.get(ledger.finish.remote(run))


def _write_shards(plan: _Plan, staging: Location, shard_rows: int, ledger, run: str,
                  opts: PrecomputeOptions) -> None:
    """The Ray Data job: items -> ``precompute_block`` -> Parquet; a failure becomes one line."""
    import ray

    ds = ray.data.from_items([dataclasses.asdict(i) for i in plan.items],
                             override_num_blocks=math.ceil(len(plan.items) / shard_rows))
    ds = ds.map_batches(precompute_block, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"spec": plan.spec, "ledger": ledger, "run_id": run,
                                   "fail_fast": opts.on_error == "fail"})
    lines = Progress(ledger, run, len(plan.items)) if opts.progress else contextlib.nullcontext()
    with _ray_data_output(log.isEnabledFor(logging.DEBUG)), runtime.bounded_io_retries(), lines:
        ds.write_parquet(staging.path, filesystem=staging.fs, min_rows_per_file=shard_rows,
                         max_rows_per_file=shard_rows, schema=schema.SCHEMA)


def _write_error(exc: Exception, first: dict[str, str] | None, dest: Location, plan: _Plan) -> Exception:
    """The one-line error of a failed write: the first fatal record, the store's answer, or Ray's."""
    if first is not None:
        return PrecomputeError(f"{first['source']}: {first['reason']}", first["source"], first["reason"])
    io_error = _first_io_error(exc)
    if io_error is not None:  # the store: one line naming the output and the store's answer
        reason = str(io_error).split("; Details:")[0].strip()
        return PrecomputeError(f"{dest.shown}: storage error, nothing published: {reason}", dest.shown, reason)
    err = PrecomputeError(f"precompute of {plan.source.shown} split {plan.split!r} failed: {exc}")
    err.__cause__ = exc
    return err


def _print_summary(summary: PrecomputeSummary) -> None:
    print(summary, flush=True)
    for r in summary.skipped[:20]:
        print(f"  skipped {r['source']}: {r['reason']}")
    if len(summary.skipped) > 20:
        print(f"  ... {len(summary.skipped) - 20} more in {schema.MANIFEST_NAME}")


def anchor_coverage(parts: Sequence[dict[str, Any]], cfg: ModelConfig):
    """The workers' anchor-coverage counts merged, and the one-line warning (None when covered)."""
    from frcnn.anchor_coverage import CoverageStats, warning_line

    stats = CoverageStats.merged(parts, cfg.rpn.neg_iou, cfg.rpn.pos_iou)
    return stats, warning_line(stats, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)


def _first_io_error(exc: BaseException) -> OSError | None:
    """The filesystem error under a failed write (Ray wraps a task's exception in its own error,
    whose ``cause`` is the original), or None when the failure was not the store's."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):
            cause = None
        if isinstance(e, OSError) and cause is None and not isinstance(e, FileExistsError):
            return e
        todo += [cause, e.__cause__, e.__context__]
    return None


def _manifest(staging: Location, result: dict[str, Any], plan: _Plan, cfg: ModelConfig, opts: PrecomputeOptions,
              seconds: float) -> dict[str, Any]:
    rows = 0
    shards = staging.list_files(".parquet")
    for name in shards:
        with staging.fs.open_input_file(staging.child(name).path) as f:
            rows += pq.read_metadata(f).num_rows
    skipped = plan.reader.problems + result["skipped"]
    if rows == 0:
        first = (skipped or [{"source": plan.source.shown, "reason": "no image"}])[0]
        raise PrecomputeError(f"no image of {plan.source.shown} split {plan.split!r} could be precomputed "
                              f"({len(skipped)} skipped; first: {first['source']}: {first['reason']})")
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": plan.source.format,
        "split": plan.split,
        "data_root": plan.source.shown,
        "source": plan.reader.describe(),
        "years": list(plan.source.years) if plan.source.years else None,
        "class_names": list(plan.names),
        "dataset_classes": list(plan.reader.classes),
        "category_ids": _category_ids(plan),
        "targets": cfg.target_fields(),
        "config_hash": cfg.target_hash(),
        "model_config": cfg.to_dict(),
        "use_difficult": bool(opts.use_difficult),
        "drop_empty": bool(opts.drop_empty),
        "jpeg_quality": int(opts.jpeg_quality),
        "rows_per_shard": int(opts.rows_per_shard),
        "columns": schema.SCHEMA.names,
        "rows": rows,
        "shards": shards,
        "split_entries": len(plan.items),
        "split_digest": items_digest(plan.items),
        "skipped": skipped,
        "warnings": result["warnings"],
        "left_out": result["left_out"],
        "positives_per_image": result["positives"] / max(result["written"], 1),
        "seconds": round(seconds, 3),
        "package_version": _package_version(),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    manifest["content_hash"] = schema.content_hash(manifest)
    return manifest


def _category_ids(plan: _Plan) -> list[int] | None:
    """The dataset's id of each model class (COCO), so detections go back out with it."""
    ids = dict(zip(plan.reader.classes, plan.reader.category_ids))
    return [ids[n] for n in plan.names] if ids else None


def open_precomputed(path: str, cfg: ModelConfig):
    """``(ray.data.Dataset, manifest)`` of a published precompute output made for ``cfg``.

    Refuses a folder without a manifest (an unpublished or killed run) and, with
    :class:`schema.ManifestMismatch` naming the field, shards made for another target config.
    """
    import ray

    loc = Location.of(path)
    fs, root = loc.fs, loc.path
    manifest = schema.read_manifest(fs, root)
    schema.check_manifest(manifest, cfg.target_fields(), str(path))
    files = [f"{root}/{name}" for name in manifest["shards"]]
    # Ray 2.60's default Parquet reader (``use_datasource_v2``) starts 32 footer-reader actors,
    # one process each, on every execution: tens of seconds on a small machine for footers the
    # manifest already vouches for. The V1 reader lists exactly these files, cheaply.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(files, filesystem=fs, file_extensions=["parquet"])
    finally:
        ctx.use_datasource_v2 = saved
    return ds, manifest
