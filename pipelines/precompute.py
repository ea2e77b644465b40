"""Ray Data precompute job: VOC split -> canvas JPEGs + RPN anchor targets in Parquet shards.

Command line (see ``jobs/data_cmds.py``)::

    frcnn-jobs precompute --dataset voc --data-root /data/voc --split trainval \\
        --out /data/precomputed/voc07-trainval [--year 2007] [--config configs/vgg16_voc.yaml]

Python::

    summary = precompute("/data/voc", "trainval", "/data/pre/trainval", cfg)
    ds, manifest = open_precomputed("/data/pre/trainval", cfg)     # what training reads

One streaming pass
------------------
``ray.data.from_items(split entries)`` -> ``map_batches(_precompute_batch)`` -> ``write_parquet``
into a private staging folder. The map is a plain function on a task pool, so Ray Data fuses it
with the write: one task reads, processes and writes one shard, and rows never travel through the
object store. (A callable class on an actor pool cannot fuse with the write: each shard would go
through the object store to separate write tasks, and the actors would hold CPUs the write tasks
then wait for.) The per-image state (anchor grid, box coder, canvas transform, filesystem handle)
is built once per worker process and cached (``_WORKERS``), which is what a callable class would
buy. Per image: read the annotation and the image through pyarrow's filesystem layer (local
paths, ``s3://``, ``gs://``...), parse the XML with defusedxml (``pipelines.voc.parse_annotation``),
decode the image with PIL (``load()`` inside ``try``, ``LOAD_TRUNCATED_IMAGES`` off, so a truncated
JPEG is a problem, not a grey half-image), resize it onto the canvas, scale the boxes, label the
anchors with ``assign_anchor_targets`` (difficult boxes excluded unless ``use_difficult``; all
boxes are stored, with their flags). Rows are the ``pipelines.schema.SCHEMA`` contract.

Memory does not grow with the dataset: a task holds one shard (at most ``rows_per_shard`` rows;
fewer on a small split, so that every CPU gets a shard), the driver holds the split list (paths)
and the problem records. Measured: peak RSS of driver + Ray workers for 400 images is within 1 %
of that for 40.

How problems travel
-------------------
The map emits *only good rows*; every problem (skipped image, per-object warning) is sent to a
small ``_Ledger`` actor, one awaited call per batch (so nothing is in flight when the write
returns). Why an actor rather than an ``error`` column on the rows: a column would have to be
filtered out before the write *and* aggregated after it, and Ray Data cannot tee a stream, so
collecting it means a second pass over the rows (or materialising them: memory that grows with
the dataset). The ledger holds only the problem records (a handful per bad file) and a few
counters, per run id; it de-duplicates records, so a retried task does not report a file twice.
It also carries the stop signal for ``on_error="fail"``: the task that meets the first problem
records it there before raising, and the driver re-raises it as ``"<file>: <reason>"``. One
ledger serves all the runs of a driver (a named actor): an actor start is a process start.

What is a problem
-----------------
Skipped images (``manifest["skipped"]``): corrupt or truncated image, annotation that does not
parse or declares entities (billion laughs), split entry with no annotation or no image file, and
(``drop_empty`` only) images with no target box. Warnings (``manifest["warnings"]``, the image
is still written): objects dropped (missing ``<bndbox>``, inverted or zero-area box, unknown class,
box wholly outside the image) or clipped to the image, annotation size that disagrees with the
image, and images with no target box (no object, or only difficult ones without
``use_difficult``), which are kept as all-negative examples unless ``drop_empty``.
``on_error="fail"`` stops at the first skipped image or dropped/clipped object; an image that
simply has no objects is a valid negative and never fails the run.

Reading back: ``open_precomputed`` checks the manifest against the model config and reads exactly
the shards it lists.

Publishing
----------
Shards and then ``_frcnn_manifest.json`` (last) are written into ``<out>.staging-<id>``. The
staging folder is then renamed to ``out`` (local filesystem; with ``overwrite`` the old ``out`` is
moved aside first and deleted after), or, on object stores, where there is no rename, copied
into ``out`` with the manifest copied last (readers require the manifest: ``read_manifest``). A
killed run leaves only a staging folder, which readers never open; it is safe to delete.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import posixpath
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from frcnn.config import ModelConfig
from pipelines.voc import (
    AnnotationError,
    list_split,
    load_class_names,
    parse_annotation,
    read_bytes,
    resolve_filesystem,
)

__all__ = [
    "PrecomputeError",
    "PrecomputeSummary",
    "check_output",
    "open_precomputed",
    "precompute",
    "process_item",
]

log = logging.getLogger(__name__)
# ``pipelines.schema`` imports torch (seconds): it is imported inside the functions that use it,
# so that the ledger actor, which unpickles this module and needs none of it, starts fast.


FORMAT_VERSION = 1
_BATCH_SIZE = 8  # images per map call: a few MB of rows at an 800x800 canvas


class PrecomputeError(RuntimeError):
    """The run stopped (``on_error="fail"``) or could not produce any output."""

    def __init__(self, message: str, source: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.source, self.reason))


class _SimulatedCrash(RuntimeError):
    """``_fail_after``: a test-only crash in the middle of the run."""


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

    def __str__(self) -> str:
        return (f"precompute: {self.rows} images written in {len(self.shards)} shard(s), "
                f"{len(self.skipped)} skipped, {len(self.warnings)} warning(s), "
                f"{self.positives_per_image:.1f} positive anchors/image, "
                f"{self.images_per_s:.1f} images/s ({self.seconds:.1f} s) -> {self.out}")


# --------------------------------------------------------------------------- per image


def _record(image_id: str, source: str, reason: str) -> dict[str, str]:
    return {"image_id": image_id, "source": source, "reason": reason}


class _Worker:
    """Everything one image needs that does not change between images (built once per process)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from PIL import ImageFile

        from frcnn.anchors import grid_anchors
        from frcnn.boxes import BoxCoder
        from frcnn.canvas import CanvasTransform

        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a problem, not half an image
        cfg = ModelConfig.from_dict(spec["cfg"])
        self.cfg = cfg
        self.class_names = tuple(spec["class_names"])
        self.use_difficult = bool(spec["use_difficult"])
        self.drop_empty = bool(spec["drop_empty"])
        self.jpeg_quality = int(spec["jpeg_quality"])
        self.transform = CanvasTransform(cfg.canvas.height, cfg.canvas.width)
        fh, fw = cfg.feature_size
        self.anchors = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
        self.coder = BoxCoder(cfg.rpn.box_weights)
        # Paths from list_split keep the data root's form: map them onto one filesystem handle
        # instead of building a filesystem (S3 credentials...) per file.
        self.root_shown = spec["root_shown"]
        self.fs, self.root_path = resolve_filesystem(spec["data_root"])

    def read(self, path: str) -> bytes:
        if path.startswith(self.root_shown):
            return read_bytes(self.fs, self.root_path.rstrip("/") + path[len(self.root_shown):])
        fs, p = resolve_filesystem(path)
        return read_bytes(fs, p)

    def process(self, item: dict[str, Any]):
        """-> (row or None, skipped records, warning records, fatal records, positives)."""
        import torch
        from PIL import Image

        from frcnn.anchors import assign_anchor_targets
        from pipelines import schema

        image_id = item["image_id"]
        ann_path = item["annotation_path"]
        img_path = item["image_path"]
        warnings: list[dict[str, str]] = []
        fatal: list[dict[str, str]] = []  # warnings that stop an on_error="fail" run

        def skip(source: str, reason: str):
            rec = _record(image_id, source, reason)
            return None, [rec], warnings, fatal + [rec], 0

        stem = posixpath.splitext(posixpath.basename(ann_path))[0]
        try:
            xml = self.read(ann_path)
        except FileNotFoundError:
            if img_path is None:
                return skip(ann_path, f"split entry {stem!r} has no annotation file and no image file")
            return skip(ann_path, "annotation file not found")
        except OSError as exc:
            return skip(ann_path, f"cannot read annotation file: {exc}")
        if img_path is None:
            expected = posixpath.join(item["year_dir"], "JPEGImages", f"{stem}.jpg")
            return skip(expected, "no image file for this split entry (looked for .jpg, .jpeg, .png)")

        try:
            ann, problems = parse_annotation(xml, ann_path, self.class_names, image_id)
        except AnnotationError as exc:
            return skip(exc.source, exc.reason)
        for p in problems:
            rec = _record(image_id, p.source, p.reason)
            warnings.append(rec)
            fatal.append(rec)

        try:
            data = self.read(img_path)
            image = Image.open(io.BytesIO(data))
            image.load()
        except FileNotFoundError:
            return skip(img_path, "image file not found")
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, bombs...
            return skip(img_path, f"image does not decode: {type(exc).__name__}: {exc}")

        boxes = np.asarray(ann.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(ann.labels, dtype=np.int32).reshape(-1)
        difficult = np.asarray(ann.difficult, dtype=bool).reshape(-1)
        if (image.width, image.height) != (ann.width, ann.height):
            rec = _record(image_id, ann_path,
                          f"annotation <size> {ann.width}x{ann.height} differs from the image's "
                          f"{image.width}x{image.height} ({img_path}); boxes clipped to the image")
            warnings.append(rec)
            fatal.append(rec)
            limits = np.array([image.width, image.height] * 2, dtype=np.float32)
            boxes = np.clip(boxes, 0.0, limits)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]

        n_targets = len(labels) if self.use_difficult else int((~difficult).sum())
        if n_targets == 0:  # nothing for the RPN to find: every anchor is a negative
            if len(labels):
                what = "only difficult objects (not targets without use_difficult)"
            else:
                what = "no valid object left" if problems else "no objects"
            if self.drop_empty:
                return skip(ann_path, f"{what}: dropped (drop_empty)")
            warnings.append(_record(image_id, ann_path, f"{what}: kept as an all-negative example"))

        canvas, scale = self.transform.apply_image(image)
        H, W = canvas.shape[:2]
        cboxes = boxes * np.float32(scale)
        cboxes[:, 0::2] = np.clip(cboxes[:, 0::2], 0.0, W)
        cboxes[:, 1::2] = np.clip(cboxes[:, 1::2], 0.0, H)
        cboxes = cboxes.astype(np.float32)
        target_boxes = cboxes if self.use_difficult else cboxes[~difficult]
        t = assign_anchor_targets(self.anchors, torch.from_numpy(np.ascontiguousarray(target_boxes)), (H, W),
                                  self.cfg.rpn.pos_iou, self.cfg.rpn.neg_iou, self.coder)
        pos = t.pos_index
        row = {
            "image_id": image_id,
            "image": schema.encode_canvas(canvas, self.jpeg_quality),
            "orig_height": int(image.height),
            "orig_width": int(image.width),
            "scale": float(scale),
            "boxes": cboxes.reshape(-1),
            "labels": labels,
            "difficult": difficult,
            "anchor_labels": t.labels.numpy().astype(np.int8),
            "pos_anchor_index": pos.numpy().astype(np.int32),
            "pos_anchor_deltas": t.deltas[pos].numpy().astype(np.float32).reshape(-1),
        }
        return row, [], warnings, fatal, int(pos.numel())


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """Python list of 1-d numpy arrays -> ListArray, without a per-element Python loop."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = value_type.to_pandas_dtype()
    values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type=value_type))


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as built by ``process_item`` -> a table with exactly ``schema.SCHEMA``."""
    from pipelines import schema

    columns = []
    for f in schema.SCHEMA:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            columns.append(_list_column(values, f.type.value_type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema.SCHEMA)


def process_item(item: dict[str, Any], spec: dict[str, Any]):
    """One split entry, outside Ray (for tests and debugging); see ``_Worker.process``."""
    return _Worker(spec).process(item)


_WORKERS: dict[str, _Worker] = {}  # per worker process: built on the first batch, reused after


def _precompute_batch(batch: pa.Table, *, spec: dict[str, Any], ledger: Any, run_id: str,
                      fail_fast: bool, fail_after: int | None) -> pa.Table:
    """The ``map_batches`` function: split entries in, good rows out, problems to the ledger."""
    import ray

    key = json.dumps(spec, sort_keys=True)
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()
        worker = _WORKERS[key] = _Worker(spec)
    rows, skipped, warnings = [], [], []
    positives = 0
    for item in batch.to_pylist():
        row, sk, wa, fatal, npos = worker.process(item)
        if fatal and fail_fast:
            rec = fatal[0]
            ray.get(ledger.fatal.remote(run_id, rec))
            raise PrecomputeError(f"{rec['source']}: {rec['reason']}", rec["source"], rec["reason"])
        skipped += sk
        warnings += wa
        if row is not None:
            rows.append(row)
            positives += npos
    total = ray.get(ledger.report.remote(run_id, len(batch), len(rows), positives, skipped, warnings))
    if fail_after is not None and total >= fail_after:
        ray.get(ledger.crash.remote(run_id))
        raise _SimulatedCrash(f"simulated crash after {total} images (_fail_after={fail_after})")
    return rows_to_table(rows)


class _Ledger:
    """Problem records and counters, per run id (a Ray actor; see the module docstring).

    One ledger serves every run of a driver (a named actor, found again with ``get_if_exists``):
    starting an actor costs a process start, seconds on a busy machine, per run otherwise.
    A run's state is dropped when the driver collects it (``finish``).
    """

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.closed: collections.deque[str] = collections.deque(maxlen=1000)

    def _run(self, run_id: str) -> dict[str, Any]:
        if run_id in self.closed:  # a straggler of a finished (failed) run: not kept
            return _new_run()
        return self.runs.setdefault(run_id, _new_run())

    def report(self, run_id: str, processed: int, written: int, positives: int,
               skipped: list, warnings: list) -> int:
        run = self._run(run_id)
        run["processed"] += processed
        run["written"] += written
        run["positives"] += positives
        for name, records in (("skipped", skipped), ("warnings", warnings)):
            for r in records:  # keyed: a retried task does not report a file twice
                run[name].setdefault((r["image_id"], r["source"], r["reason"]), r)
        return run["processed"]

    def fatal(self, run_id: str, record: dict[str, str]) -> None:
        run = self._run(run_id)
        if run["first_fatal"] is None:
            run["first_fatal"] = record

    def crash(self, run_id: str) -> None:
        self._run(run_id)["crashed"] = True

    def finish(self, run_id: str) -> dict[str, Any]:
        run = self.runs.pop(run_id, None) or _new_run()
        self.closed.append(run_id)
        key = lambda r: (r["source"], r["reason"])  # noqa: E731 - stable, readable manifest order
        run["skipped"] = sorted(run["skipped"].values(), key=key)
        run["warnings"] = sorted(run["warnings"].values(), key=key)
        return run


def _new_run() -> dict[str, Any]:
    return {"processed": 0, "written": 0, "positives": 0, "skipped": {}, "warnings": {},
            "first_fatal": None, "crashed": False}


_LEDGER: dict[tuple[str, str], Any] = {}


def _get_ledger():
    """The driver's ledger actor, reused across runs. The handle is kept here: a named actor with
    no handle left is garbage-collected, and a run starting at that moment met a dead actor."""
    import ray

    ctx = ray.get_runtime_context()
    key = (str(ctx.gcs_address), ctx.get_job_id())
    if key not in _LEDGER:
        _LEDGER.clear()
        _LEDGER[key] = ray.remote(_Ledger).options(
            name="frcnn-precompute-ledger", get_if_exists=True, num_cpus=0).remote()
    return _LEDGER[key]


# --------------------------------------------------------------------------- output folder


def _shown(path_or_uri: str) -> str:
    """The form list_split gives paths under ``path_or_uri`` (absolute local path, or the URI)."""
    text = os.fspath(path_or_uri)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def check_output(out: str, overwrite: bool) -> tuple[pafs.FileSystem, str]:
    """Refuse an existing ``out`` unless ``overwrite`` (called before any work is done)."""
    fs, path = resolve_filesystem(out)
    path = path.rstrip("/")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise FileExistsError(f"{out}: exists and is a file, not a precompute output folder")
    if info.type == pafs.FileType.Directory and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    return fs, path


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    with fs.open_output_stream(path, compression=None) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=False).encode())


def _publish(fs: pafs.FileSystem, staging: str, out: str, shards: list[str]) -> None:
    from pipelines import schema

    if isinstance(fs, pafs.LocalFileSystem):
        old = None
        if os.path.lexists(out):
            old = f"{out}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    # Object stores: no rename. Make the old output unreadable first (its manifest goes first),
    # copy the shards, copy the manifest last: it is the marker readers require. A run killed in
    # between leaves `out` unreadable (refused, never half-read); staging still holds it all.
    if _exists(fs, out):
        manifest = f"{out}/{schema.MANIFEST_NAME}"
        if _exists(fs, manifest):
            fs.delete_file(manifest)
        fs.delete_dir(out)
    fs.create_dir(out)
    for name in shards + [schema.MANIFEST_NAME]:
        fs.copy_file(f"{staging}/{name}", f"{out}/{name}")
    fs.delete_dir(staging)


def _package_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("frcnn-jobs")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


def _leftover_staging(fs: pafs.FileSystem, out: str) -> list[str]:
    if not isinstance(fs, pafs.LocalFileSystem):
        return []
    parent, name = os.path.split(out)
    try:
        return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f"{name}.staging-"))
    except OSError:
        return []


# --------------------------------------------------------------------------- the job


def precompute(
    data_root: str,
    split: str,
    out: str,
    cfg: ModelConfig,
    *,
    years: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    on_error: str = "skip",
    overwrite: bool = False,
    use_difficult: bool = False,
    drop_empty: bool = False,
    rows_per_shard: int = 256,
    jpeg_quality: int = 95,
    progress: bool = True,
    _fail_after: int | None = None,
) -> PrecomputeSummary:
    """Precompute canvas images and RPN anchor targets of one VOC split into Parquet shards.

    CLI: ``frcnn-jobs precompute --dataset voc --data-root DATA --split trainval --out OUT``.

    ``data_root`` and ``out`` are local paths or URIs (``s3://``, ``gs://``...). Class names:
    ``class_names``, else ``cfg.class_names``, else the dataset's (``classes.txt`` or VOC's 20);
    they must number ``cfg.num_classes``. ``on_error``: ``"skip"`` reports problems in the
    manifest and goes on, ``"fail"`` raises :class:`PrecomputeError` ``"<file>: <reason>"`` at the
    first one and publishes nothing. An existing ``out`` is refused (``FileExistsError``) before
    any work unless ``overwrite``; it is replaced only once the new output is complete.
    ``rows_per_shard``: at most this many rows per Parquet file (one task per shard).
    ``progress``: Ray Data's progress bars while running and a printed summary at the end.
    ``_fail_after`` (tests only): raise once that many images have been processed, leaving the
    staging folder behind as a killed run would. Uses the running Ray instance, or starts a local
    one. See the module docstring for the pipeline, the problem ledger and the publishing protocol.
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

    fs, out_path = check_output(out, overwrite)  # refuse before any work
    names = tuple(class_names) if class_names else (cfg.class_names or load_class_names(data_root))
    if len(names) != cfg.num_classes:
        raise ValueError(f"{len(names)} class names {list(names)} for a model config with "
                         f"num_classes={cfg.num_classes}")
    if cfg.class_names and tuple(cfg.class_names) != names:
        raise ValueError(f"class names {list(names)} differ from the model config's {list(cfg.class_names)}")
    items = list_split(data_root, split, years)
    if not items:
        raise ValueError(f"{data_root}: split {split!r} is empty")
    for stale in _leftover_staging(fs, out_path):
        log.warning("%s: staging folder left by an interrupted run (never read; safe to delete)", stale)

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    spec = {
        "cfg": cfg.to_dict(),
        "class_names": list(names),
        "use_difficult": use_difficult,
        "drop_empty": drop_empty,
        "jpeg_quality": int(jpeg_quality),
        "data_root": os.fspath(data_root),
        "root_shown": _shown(data_root),
    }
    staging = f"{out_path}.staging-{uuid.uuid4().hex[:12]}"
    ctx = ray.data.DataContext.get_current()
    saved_progress = ctx.enable_progress_bars
    ledger = _get_ledger()
    run_id = uuid.uuid4().hex
    t0 = time.perf_counter()
    crashed = collected = False
    try:
        ctx.enable_progress_bars = bool(progress)
        fs.create_dir(staging, recursive=True)
        # One input block per shard: the map fuses with the write, so one task reads, processes
        # and writes one shard (rows never travel through the object store). Shards shrink below
        # rows_per_shard when that would leave CPUs idle on a small split.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shard_rows = max(1, min(int(rows_per_shard), math.ceil(len(items) / cpus)))
        n_blocks = math.ceil(len(items) / shard_rows)
        ds = ray.data.from_items([dataclasses.asdict(i) for i in items], override_num_blocks=n_blocks)
        ds = ds.map_batches(
            _precompute_batch,
            batch_size=_BATCH_SIZE,
            batch_format="pyarrow",
            fn_kwargs={"spec": spec, "ledger": ledger, "run_id": run_id, "fail_fast": on_error == "fail",
                       "fail_after": _fail_after},
        )
        try:
            ds.write_parquet(staging, filesystem=fs, min_rows_per_file=shard_rows,
                             max_rows_per_file=shard_rows, schema=schema.SCHEMA)
        except Exception as exc:
            collected = True
            result = ray.get(ledger.finish.remote(run_id))
            if result["crashed"]:
                crashed = True  # behave like a killed run: leave the staging folder as it is
                raise _SimulatedCrash(f"simulated crash after {result['processed']} images") from None
            first = result["first_fatal"]
            if first is not None:
                raise PrecomputeError(f"{first['source']}: {first['reason']}", first["source"],
                                      first["reason"]) from None
            raise PrecomputeError(f"precompute of {data_root} split {split!r} failed: {exc}") from exc
        collected = True
        result = ray.get(ledger.finish.remote(run_id))

        infos = fs.get_file_info(pafs.FileSelector(staging))
        shards = sorted(posixpath.basename(i.path) for i in infos
                        if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        rows = 0
        for name in shards:
            with fs.open_input_file(f"{staging}/{name}") as f:
                rows += pq.read_metadata(f).num_rows
        if rows == 0:
            first = (result["skipped"] or [{"source": data_root, "reason": "no image"}])[0]
            raise PrecomputeError(f"no image of {data_root} split {split!r} could be precomputed "
                                  f"({len(result['skipped'])} skipped; first: {first['source']}: {first['reason']})")
        seconds = time.perf_counter() - t0
        positives = result["positives"] / max(result["written"], 1)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": "voc",
            "split": split,
            "data_root": _shown(data_root),
            "years": list(years) if years else None,
            "class_names": list(names),
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
            "positives_per_image": positives,
            "seconds": round(seconds, 3),
            "package_version": _package_version(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json(fs, f"{staging}/{schema.MANIFEST_NAME}", manifest)  # last: the readable marker
        _publish(fs, staging, out_path, shards)
    except BaseException:
        if not collected:
            ledger.finish.remote(run_id)  # drop whatever the run reported
        if not crashed:
            try:
                fs.delete_dir(staging)
            except Exception:  # noqa: BLE001 - best effort; a leftover staging folder is harmless
                pass
        raise
    finally:
        ctx.enable_progress_bars = saved_progress

    seconds = time.perf_counter() - t0
    summary = PrecomputeSummary(
        out=_shown(out), rows=rows, shards=shards, skipped=manifest["skipped"], warnings=manifest["warnings"],
        positives_per_image=positives, seconds=seconds, images_per_s=len(items) / seconds, manifest=manifest)
    if progress:
        print(summary)
        for r in summary.skipped[:20]:
            print(f"  skipped {r['source']}: {r['reason']}")
        if len(summary.skipped) > 20:
            print(f"  ... {len(summary.skipped) - 20} more in {schema.MANIFEST_NAME}")
    return summary


def open_precomputed(path: str, cfg: ModelConfig):
    """``(ray.data.Dataset, manifest)`` of a published precompute output made for ``cfg``.

    Refuses a folder without a manifest (an unpublished or killed run) and, with
    :class:`schema.ManifestMismatch` naming the field, shards made for another target config.
    """
    import ray

    from pipelines import schema

    fs, root = resolve_filesystem(path)
    root = root.rstrip("/")
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
