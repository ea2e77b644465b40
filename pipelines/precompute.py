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
from pipelines import lease, runtime, storage
from pipelines.precompute_job import PrecomputeError, Progress, get_ledger, precompute_block
from pipelines.precompute_rows import process_item, rows_to_table
from pipelines.storage import Location
from pipelines.voc import list_split, load_class_names

__all__ = [
    "PrecomputeError",
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
    dataset's: every model class must be one of them (``ValueError`` naming those that are not)."""
    names = tuple(cfg.class_names) if cfg.class_names else tuple(dataset_classes)
    if len(names) != cfg.num_classes:
        raise ValueError(f"{len(names)} class names {list(names)} for a model config with "
                         f"num_classes={cfg.num_classes}")
    missing = [n for n in names if n not in set(dataset_classes)]
    if missing:
        raise ValueError(f"model class(es) {', '.join(map(repr, missing))} not in the dataset {dataset} "
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


def precompute(
    data_root: str,
    split: str,
    out: str,
    cfg: ModelConfig,
    *,
    years: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    on_error: str = "skip",
    overwrite: bool = False,
    use_difficult: bool = False,
    drop_empty: bool = False,
    rows_per_shard: int = 256,
    jpeg_quality: int = 95,
    progress: bool = True,
) -> PrecomputeSummary:
    """Precompute canvas images and RPN anchor targets of one VOC split into Parquet shards.

    CLI: ``frcnn-jobs precompute --dataset voc --data-root DATA --split trainval --out OUT``.

    ``data_root`` and ``out`` are local paths or URIs (``s3://``, ``gs://``...). ``classes``: the
    dataset's class names (default: ``classes.txt``, else VOC's 20); the model's are
    ``cfg.class_names`` when set (see the module docstring). ``on_error``: ``"skip"`` reports
    problems in the manifest and goes on, ``"fail"`` raises :class:`PrecomputeError`
    ``"<file>: <reason>"`` at the first one and publishes nothing. An existing ``out`` is refused
    (``FileExistsError``) before any work unless ``overwrite``; it is replaced only once the new
    output is complete. ``rows_per_shard``: at most this many rows per Parquet file (one task per
    shard). ``progress``: progress lines while running and a summary at the end. Uses the running
    Ray instance, or starts a local one.
    """
    import ray

    from pipelines import schema

    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if int(rows_per_shard) < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if isinstance(years, str):
        years = [y for y in years.split(",") if y.strip()]

    dest = check_output(out, overwrite)  # refuse before any work
    dataset_classes = tuple(classes) if classes else load_class_names(data_root)
    names = model_classes(cfg, dataset_classes, storage.shown(data_root))
    items = list_split(data_root, split, years)
    if not items:
        raise ValueError(f"{data_root}: split {split!r} is empty")
    run = storage.new_run_name()
    staging = storage.staging_location(dest, run)

    runtime.init_ray()
    spec = {
        "cfg": cfg.to_dict(),
        "class_names": list(names),
        "dataset_classes": list(dataset_classes),
        "use_difficult": use_difficult,
        "drop_empty": drop_empty,
        "jpeg_quality": int(jpeg_quality),
        "data_root": str(data_root),
        "root_shown": storage.shown(data_root),
    }
    ledger = get_ledger()
    t0 = time.perf_counter()
    collected = False
    try:
        lease.claim(dest, run)  # refused while a live run writes dest; cleans what dead runs left
        staging.create_dir()
        # One input block per shard: the map fuses with the write, so one task reads, processes
        # and writes one shard. A few blocks per CPU, so that no CPU idles behind a long last one.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shard_rows = max(1, min(int(rows_per_shard),
                                max(_MIN_SHARD_ROWS, math.ceil(len(items) / (_BLOCKS_PER_CPU * cpus)))))
        ds = ray.data.from_items([dataclasses.asdict(i) for i in items],
                                 override_num_blocks=math.ceil(len(items) / shard_rows))
        ds = ds.map_batches(precompute_block, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"spec": spec, "ledger": ledger, "run_id": run,
                                       "fail_fast": on_error == "fail"})
        lines = Progress(ledger, run, len(items)) if progress else contextlib.nullcontext()
        with _ray_data_output(log.isEnabledFor(logging.DEBUG)), runtime.bounded_io_retries(), lines:
            try:
                ds.write_parquet(staging.path, filesystem=staging.fs, min_rows_per_file=shard_rows,
                                 max_rows_per_file=shard_rows, schema=schema.SCHEMA)
            except Exception as exc:
                collected = True
                first = ray.get(ledger.finish.remote(run))["first_fatal"]
                if first is not None:
                    raise PrecomputeError(f"{first['source']}: {first['reason']}", first["source"],
                                          first["reason"]) from None
                io_error = _first_io_error(exc)
                if io_error is not None:  # the store: one line naming the output and the store's answer
                    reason = str(io_error).split("; Details:")[0].strip()
                    raise PrecomputeError(f"{dest.shown}: storage error, nothing published: {reason}",
                                          dest.shown, reason) from None
                raise PrecomputeError(f"precompute of {data_root} split {split!r} failed: {exc}") from exc
        collected = True
        result = ray.get(ledger.finish.remote(run))
        manifest = _manifest(staging, result, data_root, split, years, dataset_classes, names, cfg, items,
                             use_difficult=use_difficult, drop_empty=drop_empty, jpeg_quality=jpeg_quality,
                             rows_per_shard=rows_per_shard, seconds=time.perf_counter() - t0)
        coverage, coverage_warning = anchor_coverage(result["coverage"], cfg)
        manifest["anchor_coverage"] = {**coverage.metrics(), "warning": coverage_warning}
        storage.publish(staging, dest, schema.MANIFEST_NAME, manifest, replace=overwrite)
    except BaseException as exc:
        if not collected:
            ledger.finish.remote(run)  # drop whatever the run reported
        if isinstance(exc, KeyboardInterrupt):
            runtime.stop_local_ray()  # no write task may outlive the staging folder it writes into
        storage.discard(staging)
        if progress and isinstance(exc, KeyboardInterrupt):
            print(f"precompute interrupted: nothing published to {dest.shown}"
                  + (" (the existing output is unchanged)" if dest.exists() else ""), flush=True)
        raise

    seconds = time.perf_counter() - t0
    summary = PrecomputeSummary(
        out=dest.shown, rows=manifest["rows"], shards=manifest["shards"], skipped=manifest["skipped"],
        warnings=manifest["warnings"], positives_per_image=manifest["positives_per_image"], seconds=seconds,
        images_per_s=len(items) / seconds, manifest=manifest, left_out=manifest["left_out"], coverage=coverage)
    if coverage_warning:
        log.warning("%s", coverage_warning)
    if progress:
        print(summary, flush=True)
        for r in summary.skipped[:20]:
            print(f"  skipped {r['source']}: {r['reason']}")
        if len(summary.skipped) > 20:
            print(f"  ... {len(summary.skipped) - 20} more in {schema.MANIFEST_NAME}")
    return summary


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


def _manifest(staging: Location, result: dict[str, Any], data_root: str, split: str, years, dataset_classes,
              names, cfg: ModelConfig, items, *, use_difficult: bool, drop_empty: bool, jpeg_quality: int,
              rows_per_shard: int, seconds: float) -> dict[str, Any]:
    from pipelines import schema

    shards = staging.list_files(".parquet")
    rows = 0
    for name in shards:
        with staging.fs.open_input_file(staging.child(name).path) as f:
            rows += pq.read_metadata(f).num_rows
    if rows == 0:
        first = (result["skipped"] or [{"source": data_root, "reason": "no image"}])[0]
        raise PrecomputeError(f"no image of {data_root} split {split!r} could be precomputed "
                              f"({len(result['skipped'])} skipped; first: {first['source']}: {first['reason']})")
    return {
        "format_version": FORMAT_VERSION,
        "dataset": "voc",
        "split": split,
        "data_root": storage.shown(data_root),
        "years": list(years) if years else None,
        "class_names": list(names),
        "dataset_classes": list(dataset_classes),
        "targets": cfg.target_fields(),
        "config_hash": cfg.target_hash(),
        "model_config": cfg.to_dict(),
        "use_difficult": bool(use_difficult),
        "drop_empty": bool(drop_empty),
        "jpeg_quality": int(jpeg_quality),
        "rows_per_shard": int(rows_per_shard),
        "columns": schema.SCHEMA.names,
        "rows": rows,
        "shards": shards,
        "split_entries": len(items),
        "skipped": result["skipped"],
        "warnings": result["warnings"],
        "left_out": result["left_out"],
        "positives_per_image": result["positives"] / max(result["written"], 1),
        "seconds": round(seconds, 3),
        "package_version": _package_version(),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def open_precomputed(path: str, cfg: ModelConfig):
    """``(ray.data.Dataset, manifest)`` of a published precompute output made for ``cfg``.

    Refuses a folder without a manifest (an unpublished or killed run) and, with
    :class:`schema.ManifestMismatch` naming the field, shards made for another target config.
    """
    import ray

    from pipelines import schema

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
