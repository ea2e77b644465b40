"""Detections on disk: what ``infer`` writes, the one reader of its published partitions, and the
detections files ``evaluate --detections`` takes.

Layout of an ``infer`` output (written by ``pipelines/infer.py``)::

    <output>/run=<run>/part-*.parquet        detections (OUTPUT_SCHEMA)
    <output>/run=<run>/_errors/part-*.parquet unreadable inputs (ERROR_SCHEMA)
    <output>/run=<run>/_SUCCESS              JSON summary, written LAST: the publish signal
    <output>/_staging/...                    runs in progress (never read)

Only partitions holding ``_SUCCESS`` are read (:func:`published_runs`); ``_errors`` and
``_staging`` start with ``_``, which pyarrow's and Spark's dataset readers skip.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from frcnn.errors import DatasetError
from pipelines.predict import PREDICTION_SCHEMA
from pipelines.storage import Location, is_published

__all__ = ["ERRORS", "ERROR_SCHEMA", "OUTPUT_SCHEMA", "RUN_PREFIX", "SUCCESS", "MODEL_COLUMNS",
           "published_ids", "published_runs", "read_detections", "read_published", "write_part"]

SUCCESS = "_SUCCESS"
ERRORS = "_errors"
RUN_PREFIX = "run="
MODEL_COLUMNS = ("model_name", "model_version", "model_uri", "model_sha256")
_TS = pa.timestamp("us", tz="UTC")

_PREDICTION_COLUMNS = ("image_id", "boxes", "scores", "labels", "class_names", "category_ids", "height", "width")
OUTPUT_SCHEMA = pa.schema([
    *(PREDICTION_SCHEMA.field(c) for c in _PREDICTION_COLUMNS),
    *((c, pa.string()) for c in MODEL_COLUMNS),
    ("train_run_id", pa.string()),
    ("infer_run_id", pa.string()),
    ("processed_at", _TS),
])

ERROR_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("reason", pa.string()),
    *((c, pa.string()) for c in MODEL_COLUMNS),
    ("infer_run_id", pa.string()),
    ("processed_at", _TS),
])


# --------------------------------------------------------------------------- writing


def write_part(batch: pa.Table, *, staging: Location, meta: dict[str, Any]) -> pa.Table:
    """Ray Data map: one batch of predictions -> ``part-<hash>.parquet`` (detections) and
    ``_errors/part-<hash>.parquet`` in ``staging``; returns one row of counts. The name is a hash
    of the ids it holds: a retried task rewrites its own file instead of adding a copy."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    digest = hashlib.sha1("\n".join(batch.column("image_id").to_pylist()).encode()).hexdigest()[:20]
    now = _dt.datetime.now(_dt.UTC)
    failed = pc.not_equal(pc.fill_null(batch.column("error"), ""), "")
    good, bad = batch.filter(pc.invert(failed)), batch.filter(failed)

    def consts(n: int, names) -> list[pa.Array]:
        return [pa.array([meta.get(c)] * n, pa.string()) for c in names]

    if good.num_rows:
        n = good.num_rows
        cols = [good.column(c) for c in _PREDICTION_COLUMNS]
        table = pa.Table.from_arrays(
            [*cols, *consts(n, (*MODEL_COLUMNS, "train_run_id", "infer_run_id")), pa.array([now] * n, _TS)],
            schema=OUTPUT_SCHEMA)
        pq.write_table(table, staging.child(f"part-{digest}.parquet").path, filesystem=staging.fs)
    if bad.num_rows:
        n = bad.num_rows
        table = pa.Table.from_arrays(
            [bad.column("image_id"), bad.column("path"), bad.column("error"),
             *consts(n, (*MODEL_COLUMNS, "infer_run_id")), pa.array([now] * n, _TS)], schema=ERROR_SCHEMA)
        staging.child(ERRORS).create_dir()
        pq.write_table(table, staging.child(ERRORS, f"part-{digest}.parquet").path, filesystem=staging.fs)
    n_det = int(pc.sum(pc.list_value_length(good.column("scores"))).as_py() or 0) if good.num_rows else 0
    failures = bad.select(["image_id", "path", "error"]).slice(0, 100).to_pylist()
    return pa.table({"rows": [good.num_rows], "errors": [bad.num_rows], "detections": [n_det],
                     "failures": pa.array([[{"image_id": f["image_id"], "path": f["path"], "reason": f["error"]}
                                            for f in failures]])})


# --------------------------------------------------------------------------- published partitions


def published_runs(output: str | Location) -> list[str]:
    """Names of the published partitions (``run=...`` folders holding ``_SUCCESS``), oldest first."""
    root = Location.of(output)
    return [d for d in root.list_dirs() if d.startswith(RUN_PREFIX) and is_published(root.child(d), SUCCESS)]


def _published_dataset(output: str | Location, errors: bool = False):
    import pyarrow.dataset as ds

    root = Location.of(output)
    files = []
    for run in published_runs(root):
        folder = root.child(run, ERRORS) if errors else root.child(run)
        files.extend(folder.child(name).path for name in folder.list_files(".parquet"))
    schema = (ERROR_SCHEMA if errors else OUTPUT_SCHEMA).append(pa.field("run", pa.string()))
    return ds.dataset(files, schema=schema, filesystem=root.fs, format="parquet",
                      partitioning=ds.partitioning(pa.schema([("run", pa.string())]), flavor="hive"),
                      partition_base_dir=root.path)


def read_published(output: str | Location, errors: bool = False, columns: list[str] | None = None) -> pa.Table:
    """The union of every published partition of ``output`` (detections, or with ``errors=True``
    the error tables), plus a ``run`` column naming the partition. Unpublished runs are never read;
    columns a file lacks come back null."""
    root = Location.of(output)
    if not root.exists():
        raise FileNotFoundError(f"{root.shown}: no such output")
    return _published_dataset(root, errors).to_table(columns=columns)


def published_ids(output: str | Location, model: Any) -> set[str]:
    """The ledger of incremental runs: ids with a published detection row made by ``model`` (a
    ``pipelines.infer.ModelIdentity``): same name and version when registered, else same digest."""
    import pyarrow.dataset as ds

    root = Location.of(output)
    if not root.exists():
        return set()
    if model.registered:
        expr = (ds.field("model_name") == model.name) & (ds.field("model_version") == model.version)
    else:
        expr = ds.field("model_name").is_null() & (ds.field("model_sha256") == model.sha256)
    table = _published_dataset(root).to_table(columns=["image_id"], filter=expr)
    return set(table.column("image_id").to_pylist())


# --------------------------------------------------------------------------- detections files


def _read_files(folder: Location, names: list[str], schema: pa.Schema) -> pa.Table:
    import pyarrow.dataset as ds

    files = [folder.child(n).path for n in names]
    if not files:
        return schema.empty_table()
    try:
        return ds.dataset(files, schema=schema, filesystem=folder.fs, format="parquet").to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{folder.shown}: not readable as detections Parquet: {exc}") from exc


def read_detections(path: str | Location) -> tuple[pa.Table, pa.Table]:
    """``(detections, errors)`` of a detections path: one Parquet file; a folder of ``*.parquet``
    parts (errors in ``_errors/``); or an ``infer`` output root, whose published partitions are
    read through :func:`read_published`. Both tables carry OUTPUT_SCHEMA / ERROR_SCHEMA plus ``run``
    (null outside an ``infer`` root); columns a file lacks are null; ``error`` rows of a plain
    detections file (what ``evaluate`` writes) go to the errors table."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    loc = Location.of(path)
    if not loc.exists():
        raise FileNotFoundError(f"{loc.shown}: detections not found")
    if loc.is_dir() and any(d.startswith(RUN_PREFIX) for d in loc.list_dirs()):
        if not published_runs(loc):
            raise DatasetError(f"{loc.shown}: no published run=... partition (none holds {SUCCESS} yet)")
        return read_published(loc), read_published(loc, errors=True)
    run = pa.field("run", pa.string())
    if loc.is_file():
        try:
            raw = pq.read_table(loc.path, filesystem=loc.fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"{loc.shown}: not a readable Parquet file: {exc}") from exc
        errors = ERROR_SCHEMA.append(run).empty_table()
        if "error" in raw.column_names:
            failed = pc.not_equal(pc.fill_null(raw.column("error"), ""), "")
            bad = raw.filter(failed)
            errors = pa.table({"image_id": bad.column("image_id").cast(pa.string()),
                               "reason": bad.column("error")}).select(["image_id", "reason"])
            errors = _conform(errors, ERROR_SCHEMA.append(run))
            raw = raw.filter(pc.invert(failed))
        return _conform(raw, OUTPUT_SCHEMA.append(run)), errors
    names = loc.list_files(".parquet")
    if not names:
        raise DatasetError(f"{loc.shown}: no *.parquet detections inside")
    dets = _read_files(loc, names, OUTPUT_SCHEMA.append(run))
    errs = _read_files(loc.child(ERRORS), loc.child(ERRORS).list_files(".parquet"), ERROR_SCHEMA.append(run))
    return dets, errs


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null, the rest cast."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            try:
                cols.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DatasetError(f"column {f.name!r} is {table.column(f.name).type}, expected {f.type}") from exc
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def list_column(column: pa.ChunkedArray | pa.Array, dtype) -> list[np.ndarray]:
    """A list column -> one numpy array per row (a null list is empty)."""
    import pyarrow.compute as pc

    lengths = np.asarray(pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False), np.int64)
    values = np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=dtype)
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
