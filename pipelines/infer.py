"""Scheduled batch inference with Ray Data: images (a folder, an object-store prefix or a Parquet
table) -> detections in Parquet, published one run at a time.

Command line (see ``jobs/infer.py``, which adds the MLflow run and resolves the MODEL)::

    frcnn-jobs infer --model models:/frcnn@champion --input s3://bucket/incoming \\
        --output s3://bucket/detections --incremental --concurrency 4 --gpus-per-actor 1

Python (no MLflow, no ``jobs``: this module never imports it)::

    model = ModelIdentity.of_checkpoint(ckpt_bytes, uri="models:/frcnn@champion", name="frcnn", version="3")
    summary = run_inference("data/incoming", "out/detections", ckpt_bytes, model, incremental=True)
    table = read_published("out/detections")        # every published partition, nothing else

Inputs
------
* a folder or object-store prefix: every ``.jpg``, ``.jpeg`` and ``.png`` file below it (recursive
  listing, case-insensitive extension); the image id is the path relative to the input root
  (``sub/dir/img.jpg``);
* a Parquet table (one file, or a folder of ``*.parquet`` files holding no image): an ``image``
  column (the encoded bytes) and an id column, ``image_id`` or else ``path``.

One streaming pass
------------------
``ray.data.from_items([(image_id, path)])`` -> ``map_batches(_read_files)`` (tasks reading the bytes
through pyarrow's filesystem layer; for a table, ``read_parquet``) -> ``map_batches(InferPredictor)``
(an actor pool, ``compute=ActorPoolStrategy(size=concurrency)``, ``num_gpus=gpus_per_actor``:
``pipelines.predict.Predictor`` loads the model once per actor; greyscale, palette and RGBA images
become RGB, any size goes onto the model's canvas, boxes come back in ORIGINAL pixels) ->
``map_batches(_write_part)`` (tasks writing ``part-<hash>.parquet`` and ``_errors/part-<hash>.parquet``
into the run's staging folder and returning one small row of counts). The driver consumes only
the counts. A file name is a hash of the image ids it holds, so a retried task overwrites its own
file instead of adding a copy; before publishing, the rows in staging must equal the rows counted.

Output layout
-------------
::

    <output>/run=<UTC timestamp>-<uuid8>/part-*.parquet    detections (OUTPUT_SCHEMA)
    <output>/run=<...>/_errors/part-*.parquet               unreadable inputs (ERROR_SCHEMA)
    <output>/run=<...>/_SUCCESS                             JSON summary; written LAST
    <output>/_staging/<run>/...                             a run in progress (never read)

Publishing: a run writes only into ``<output>/_staging/<run>``. Local filesystem: ``_SUCCESS`` is
written last into staging and the folder is renamed to ``run=<run>`` (one atomic step: the
partition appears complete or not at all). Object stores (no rename): the files are copied into
``run=<run>`` and ``_SUCCESS`` is written last there: the marker alone is the publish signal,
readers (``read_published``, the incremental ledger) ignore a partition without it. A killed run
leaves only its staging folder (and on an object store perhaps an unmarked partition); the next
run deletes both for runs older than itself. Note for plain Parquet readers: ``_staging`` and
``_SUCCESS`` start with ``_``, which pyarrow and Spark skip; an unmarked partition does not.

On a multi-node cluster the input and the output must be reachable from every node (an object
store or a shared filesystem): the read and write tasks run on the workers.

Incremental runs
----------------
With ``incremental=True`` an input is skipped when a published partition already holds a row for
its ``image_id`` made by the same model: same ``model_name`` and ``model_version`` for a
registered model, else (no name/version) the same ``model_sha256`` (the checkpoint's digest).
Error rows are not in the ledger, so an unreadable input is tried again by the next run. Two runs
that overlap in time may both process the same new inputs (nothing locks the output).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.voc import IMAGE_EXTENSIONS, read_bytes, resolve_filesystem

__all__ = [
    "ERROR_SCHEMA",
    "OUTPUT_SCHEMA",
    "InferSummary",
    "ModelIdentity",
    "SimulatedKill",
    "infer_predictor_class",
    "list_inputs",
    "new_run_name",
    "published_ids",
    "published_runs",
    "read_published",
    "run_inference",
]

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STAGING = "_staging"
# Leading underscore: pyarrow, Spark and pandas skip it, so reading a partition (or the output
# root) as a Parquet dataset yields the detections, not the error table.
ERRORS = "_errors"
RUN_PREFIX = "run="
_TS = pa.timestamp("us", tz="UTC")

OUTPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("boxes", pa.list_(pa.float32())),  # N x 4 flattened, xyxy in the original image's pixels
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int32())),  # 1..C
    ("class_names", pa.list_(pa.string())),  # one per label
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("model_sha256", pa.string()),
    ("train_run_id", pa.string()),
    ("infer_run_id", pa.string()),
    ("processed_at", _TS),
])

ERROR_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("reason", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_uri", pa.string()),
    ("model_sha256", pa.string()),
    ("infer_run_id", pa.string()),
    ("processed_at", _TS),
])

_MODEL_COLUMNS = ("model_name", "model_version", "model_uri", "model_sha256")
_MAX_FAILURES_IN_SUMMARY = 100
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class SimulatedKill(RuntimeError):
    """``_fail_after``: a test-only stop in the middle of a run (staging is left as a kill leaves it)."""


# --------------------------------------------------------------------------- model identity


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
                      train_run_id: str | None = None) -> "ModelIdentity":
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


# --------------------------------------------------------------------------- summary


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
        for r in self.failures[:20]:
            lines.append(f"  failed {r['path']}: {r['reason']}")
        if self.failed > 20:
            lines.append(f"  ... {self.failed - 20} more in {self.partition}/{ERRORS}/")
        return "\n".join(lines)


# --------------------------------------------------------------------------- locations


def _shown(text: str) -> str:
    """The user-facing form of a location: a URI stays a URI, a local path becomes absolute."""
    text = os.fspath(text)
    if _URI_RE.match(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if base.rstrip("/") else posixpath.join(*parts)


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def _list_dirs(fs: pafs.FileSystem, path: str) -> list[str]:
    if _info(fs, path) != pafs.FileType.Directory:
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.type == pafs.FileType.Directory)


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    if _info(fs, path) != pafs.FileType.Directory:
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not posixpath.basename(i.path).startswith(("_", ".")))


def new_run_name(now: _dt.datetime | None = None) -> str:
    """``<UTC timestamp, ms>-<uuid8>``: sorts by start time."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:8]}"


def _run_time(run: str) -> str:
    return run.split("-", 1)[0]


# --------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    kind: str  # "files" | "table"
    root: str  # the input as shown
    items: list[dict[str, str]]  # files: image_id, fs_path, path; table: image_id
    table_files: list[str] = field(default_factory=list)  # table: fs paths of the Parquet files
    id_column: str = "image_id"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_inputs(input_uri: str) -> _Inputs:
    """Images below a folder/prefix, or the ids of a Parquet table (file or folder)."""
    fs, root = resolve_filesystem(input_uri)
    root = root.rstrip("/") or "/"
    shown = _shown(input_uri)
    kind = _info(fs, root)
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{input_uri}: input not found")
    if kind == pafs.FileType.File:
        if not root.endswith(".parquet"):
            raise ValueError(f"{input_uri}: a file input must be a Parquet table (.parquet); "
                             "give the folder for images")
        return _table_inputs(fs, [root], shown)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    images, tables = [], []
    for path in files:
        rel = path[len(root):].lstrip("/") if path.startswith(root) else posixpath.basename(path)
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _staging, _SUCCESS...
        if _is_image(rel):
            images.append({"image_id": rel, "fs_path": path, "path": _join(shown, rel)})
        elif rel.endswith(".parquet"):
            tables.append(path)
    if images:
        if tables:
            log.warning("%s: holds both images and Parquet files; reading the %d images, ignoring %d Parquet "
                        "file(s)", input_uri, len(images), len(tables))
        return _Inputs("files", shown, images)
    if tables:
        return _table_inputs(fs, tables, shown)
    log.warning("%s: no image (%s) and no Parquet table found", input_uri, ", ".join(IMAGE_EXTENSIONS))
    return _Inputs("files", shown, [])


def _table_inputs(fs: pafs.FileSystem, files: list[str], shown: str) -> _Inputs:
    import pyarrow.dataset as ds

    dataset = ds.dataset(files, filesystem=fs, format="parquet")
    names = dataset.schema.names
    if "image" not in names:
        raise ValueError(f"{shown}: Parquet input needs an 'image' column (encoded bytes); it has {names}")
    if not (pa.types.is_binary(dataset.schema.field("image").type)
            or pa.types.is_large_binary(dataset.schema.field("image").type)):
        raise ValueError(f"{shown}: column 'image' is {dataset.schema.field('image').type}, not binary")
    id_col = "image_id" if "image_id" in names else "path" if "path" in names else None
    if id_col is None:
        raise ValueError(f"{shown}: Parquet input needs an id column 'image_id' or 'path'; it has {names}")
    ids = [str(v) for v in dataset.to_table(columns=[id_col]).column(id_col).to_pylist() if v is not None]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ValueError(f"{shown}: {len(dupes)} {id_col} value(s) appear more than once (first: {dupes[0]!r}); "
                         "ids must be unique")
    return _Inputs("table", shown, [{"image_id": i} for i in ids], table_files=files, id_column=id_col)


# --------------------------------------------------------------------------- published partitions


def published_runs(output: str) -> list[str]:
    """Names of the published partitions (``run=...`` folders holding ``_SUCCESS``), oldest first."""
    fs, root = resolve_filesystem(output)
    root = root.rstrip("/")
    return [d for d in _list_dirs(fs, root)
            if d.startswith(RUN_PREFIX) and _info(fs, _join(root, d, SUCCESS)) == pafs.FileType.File]


def _published_files(output: str, errors: bool = False) -> tuple[pafs.FileSystem, str, list[str]]:
    fs, root = resolve_filesystem(output)
    root = root.rstrip("/")
    files: list[str] = []
    for d in published_runs(output):
        part_dir = _join(root, d, ERRORS) if errors else _join(root, d)
        files.extend(_parquet_files(fs, part_dir))
    return fs, root, files


def _open_published(output: str, errors: bool = False):
    import pyarrow.dataset as ds

    fs, root, files = _published_files(output, errors)
    schema = ERROR_SCHEMA if errors else OUTPUT_SCHEMA
    part_schema = pa.schema([("run", pa.string())])
    return ds.dataset(files, schema=schema.append(part_schema.field("run")), filesystem=fs, format="parquet",
                      partitioning=ds.partitioning(part_schema, flavor="hive"), partition_base_dir=root)


def read_published(output: str, errors: bool = False, columns: list[str] | None = None) -> pa.Table:
    """The union of every published partition of ``output`` (detections, or with ``errors=True`` the
    error tables), plus a ``run`` column naming the partition. Unpublished runs are never read."""
    fs, root = resolve_filesystem(output)
    if _info(fs, root.rstrip("/")) == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{output}: no such output")
    return _open_published(output, errors).to_table(columns=columns)


def published_ids(output: str, model: ModelIdentity) -> set[str]:
    """The ledger of incremental runs: ids with a published detection row made by ``model``."""
    import pyarrow.dataset as ds

    fs, root = resolve_filesystem(output)
    if _info(fs, root.rstrip("/")) == pafs.FileType.NotFound:
        return set()
    if model.registered:
        expr = (ds.field("model_name") == model.name) & (ds.field("model_version") == model.version)
    else:
        expr = ds.field("model_name").is_null() & (ds.field("model_sha256") == model.sha256)
    table = _open_published(output).to_table(columns=["image_id"], filter=expr)
    return set(table.column("image_id").to_pylist())


# --------------------------------------------------------------------------- Ray Data stages


def _read_files(batch: dict[str, np.ndarray], *, root: str) -> dict[str, np.ndarray]:
    """Ray Data map: (image_id, fs_path, path) -> + image bytes and read_error ("" when none)."""
    fs, _ = resolve_filesystem(root)
    images, errors = [], []
    for fs_path in batch["fs_path"]:
        try:
            data = read_bytes(fs, str(fs_path))
            err = "" if data else "empty file (0 bytes)"
        except Exception as exc:  # noqa: BLE001 - a file that vanished or cannot be read is an error row
            data, err = b"", f"unreadable file: {type(exc).__name__}: {exc}"
        images.append(data)
        errors.append(err)
    return {"image_id": batch["image_id"], "path": batch["path"], "image": _objects(images),
            "read_error": _objects(errors)}


def _table_rows(batch: pa.Table, *, id_column: str, keep: list[str] | None) -> dict[str, np.ndarray]:
    """Ray Data map over a Parquet input: rename the id, keep only the rows still to do."""
    ids = [None if v is None else str(v) for v in batch.column(id_column).to_pylist()]
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else ids
    images = batch.column("image").to_pylist()
    wanted = set(keep) if keep is not None else None
    out: dict[str, list] = {"image_id": [], "path": [], "image": [], "read_error": []}
    for i, image_id in enumerate(ids):
        if image_id is None or (wanted is not None and image_id not in wanted):
            continue
        data = images[i]
        out["image_id"].append(image_id)
        out["path"].append(str(paths[i]) if paths[i] is not None else image_id)
        out["image"].append(data or b"")
        out["read_error"].append("no image bytes (null)" if data is None else
                                 "" if data else "empty image bytes (0 bytes)")
    return {k: _objects(v) for k, v in out.items()}


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


_BYTESIO_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@functools.cache
def infer_predictor_class():
    """The Ray Data callable class: ``Predictor`` plus what an inference table needs. Built on first
    use: ``pipelines.predict`` imports torch (seconds), which the read and write tasks (they unpickle
    this module) and the driver-side helpers (``read_published``, the ledger) do not need."""
    from pipelines.predict import Predictor

    class InferPredictor(Predictor):
        """``Predictor`` plus what an inference table needs: a read error that happened before the model
        (kept as the reason), the input path, and the class name of each label."""

        def __init__(self, checkpoint: bytes, score_threshold: float | None = None, torch_threads: int | None = None,
                     device: str | None = None) -> None:
            super().__init__(checkpoint, device=device, score_threshold=score_threshold, torch_threads=torch_threads)
            self.class_names = list(self.model.cfg.class_names)

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            pre = [str(e) if e is not None else "" for e in batch["read_error"]]
            images = _objects([b"" if pre[i] else batch["image"][i] for i in range(len(pre))])
            out = super().__call__({"image_id": batch["image_id"], "image": images})
            # "" (not None) when the image was read: a column of only None would not stay a string
            # column on its way through Ray Data (it can come back as NaN).
            out["error"] = _objects([pre[i] or ("" if err is None else _BYTESIO_REPR.sub("", str(err)))
                                     for i, err in enumerate(out["error"])])
            out["path"] = _objects([str(p) for p in batch["path"]])
            names = self.class_names
            out["class_names"] = _objects([
                np.array([names[int(l) - 1] if 0 < int(l) <= len(names) else str(int(l)) for l in labels], dtype=object)
                for labels in out["labels"]])
            return out

    return InferPredictor


def _list_array(values: Iterable[Any], dtype, pa_type: pa.DataType) -> pa.Array:
    return pa.array([np.asarray(v, dtype=dtype).reshape(-1) for v in values], pa.list_(pa_type))


def _is_error(value: Any) -> bool:
    """The predictor's ``error`` value: a non-empty string is an error; "", None or NaN are not."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return isinstance(value, str) and value != ""


def _write_part(batch: dict[str, np.ndarray], *, staging: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data map: write this batch's detections and errors into staging; return their counts."""
    import pyarrow.parquet as pq

    fs, base = resolve_filesystem(staging)
    base = base.rstrip("/")
    ids = [str(v) for v in batch["image_id"]]
    errs = [_is_error(e) for e in batch["error"]]
    good = [i for i, e in enumerate(errs) if not e]
    bad = [i for i, e in enumerate(errs) if e]
    # Named after its content: a retried task rewrites the same file rather than adding a copy.
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20]
    now = _dt.datetime.now(_dt.timezone.utc)
    n_det = 0
    files = []
    if good:
        n = len(good)
        boxes = [batch["boxes"][i] for i in good]
        n_det = int(sum(np.asarray(b).size // 4 for b in boxes))
        table = pa.table({
            "image_id": pa.array([ids[i] for i in good], pa.string()),
            "boxes": _list_array(boxes, np.float32, pa.float32()),
            "scores": _list_array((batch["scores"][i] for i in good), np.float32, pa.float32()),
            "labels": _list_array((batch["labels"][i] for i in good), np.int32, pa.int32()),
            "class_names": pa.array([[str(x) for x in np.asarray(batch["class_names"][i], dtype=object).reshape(-1)]
                                     for i in good], pa.list_(pa.string())),
            "height": pa.array([int(batch["height"][i]) for i in good], pa.int32()),
            "width": pa.array([int(batch["width"][i]) for i in good], pa.int32()),
            **{c: pa.array([meta[c]] * n, pa.string()) for c in _MODEL_COLUMNS},
            "train_run_id": pa.array([meta["train_run_id"]] * n, pa.string()),
            "infer_run_id": pa.array([meta["infer_run_id"]] * n, pa.string()),
            "processed_at": pa.array([now] * n, _TS),
        }, schema=OUTPUT_SCHEMA)
        name = f"part-{digest}.parquet"
        pq.write_table(table, f"{base}/{name}", filesystem=fs)
        files.append(name)
    failures = []
    if bad:
        n = len(bad)
        failures = [{"image_id": ids[i], "path": str(batch["path"][i]), "reason": str(batch["error"][i])}
                    for i in bad]
        table = pa.table({
            "image_id": pa.array([f["image_id"] for f in failures], pa.string()),
            "path": pa.array([f["path"] for f in failures], pa.string()),
            "reason": pa.array([f["reason"] for f in failures], pa.string()),
            **{c: pa.array([meta[c]] * n, pa.string()) for c in _MODEL_COLUMNS},
            "infer_run_id": pa.array([meta["infer_run_id"]] * n, pa.string()),
            "processed_at": pa.array([now] * n, _TS),
        }, schema=ERROR_SCHEMA)
        fs.create_dir(f"{base}/{ERRORS}", recursive=True)
        name = f"{ERRORS}/part-{digest}.parquet"
        pq.write_table(table, f"{base}/{name}", filesystem=fs)
        files.append(name)
    return {"rows": np.array([len(good)]), "errors": np.array([len(bad)]), "detections": np.array([n_det]),
            "failures": _objects([json.dumps(failures)])}


# --------------------------------------------------------------------------- staging and publishing


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    with fs.open_output_stream(path, compression=None) as f:
        f.write(json.dumps(obj, indent=2).encode())


def _clean_stale(fs: pafs.FileSystem, root: str, run: str) -> list[str]:
    """Delete the staging folders (and unmarked partitions) of runs that started before ``run``:
    what a killed run leaves. Runs started at the same millisecond or later are left alone."""
    removed = []
    stage_root = _join(root, STAGING)
    for name in _list_dirs(fs, stage_root):
        if _run_time(name) < _run_time(run):
            fs.delete_dir(_join(stage_root, name))
            removed.append(_join(stage_root, name))
    for name in _list_dirs(fs, root):
        if (name.startswith(RUN_PREFIX) and _run_time(name[len(RUN_PREFIX):]) < _run_time(run)
                and _info(fs, _join(root, name, SUCCESS)) != pafs.FileType.File):
            fs.delete_dir(_join(root, name))
            removed.append(_join(root, name))
    for path in removed:
        log.warning("%s: left by an interrupted run; deleted", path)
    return removed


def _staged_files(fs: pafs.FileSystem, staging: str) -> tuple[list[str], list[str], int, int]:
    import pyarrow.parquet as pq

    parts = [posixpath.basename(p) for p in _parquet_files(fs, staging)]
    errs = [f"{ERRORS}/{posixpath.basename(p)}" for p in _parquet_files(fs, _join(staging, ERRORS))]

    def rows(names):
        total = 0
        for n in names:
            with fs.open_input_file(_join(staging, n)) as f:
                total += pq.read_metadata(f).num_rows
        return total

    return parts, errs, rows(parts), rows(errs)


def _publish(fs: pafs.FileSystem, staging: str, partition: str, files: list[str], summary: dict[str, Any],
             rename: bool | None = None) -> None:
    """Make the staged run visible; ``_SUCCESS`` (the summary) is always the last file written."""
    rename = isinstance(fs, pafs.LocalFileSystem) if rename is None else rename
    if rename:
        _write_json(fs, _join(staging, SUCCESS), summary)
        fs.move(staging, partition)  # a rename: the partition appears whole, marker included
        return
    # Object stores have no rename: copy, then the marker, then drop staging.
    fs.create_dir(partition, recursive=True)
    if any(f.startswith(f"{ERRORS}/") for f in files):
        fs.create_dir(_join(partition, ERRORS), recursive=True)
    for name in files:
        fs.copy_file(_join(staging, name), _join(partition, name))
    _write_json(fs, _join(partition, SUCCESS), summary)
    fs.delete_dir(staging)


# --------------------------------------------------------------------------- the job


def run_inference(
    input_uri: str,
    output_uri: str,
    checkpoint: bytes,
    model: ModelIdentity | None = None,
    *,
    incremental: bool = False,
    concurrency: int = 1,
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1,
    batch_size: int = 8,
    score_threshold: float | None = None,
    rows_per_file: int = 1024,
    infer_run_id: str | None = None,
    run_name: str | None = None,
    progress: bool = True,
    _fail_after: int | None = None,
    _rename: bool | None = None,
) -> InferSummary:
    """Detect objects in every input image (or only the new ones) and publish one partition.

    ``checkpoint``: the checkpoint file's bytes (``frcnn.training.checkpoint_state`` saved with
    ``torch.save``). ``model``: its identity (default: unregistered, keyed by the bytes' sha256).
    ``infer_run_id`` is written into every row (the MLflow run id; default: the run name).
    Uses the running Ray instance, or starts a local one. Raises on any failure; nothing is
    published then. See the module docstring for the layout, publishing and incremental rules.
    """
    import ray

    if int(batch_size) < 1 or int(concurrency) < 1 or int(rows_per_file) < 1:
        raise ValueError("batch_size, concurrency and rows_per_file must be >= 1")
    checkpoint = bytes(checkpoint)
    model = model or ModelIdentity.of_checkpoint(checkpoint, uri="<bytes>")
    run = run_name or new_run_name()
    infer_run_id = infer_run_id or run
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()

    out_fs, out_root = resolve_filesystem(output_uri)
    out_root = out_root.rstrip("/")
    out_shown = _shown(output_uri)
    if _info(out_fs, out_root) == pafs.FileType.File:
        raise FileExistsError(f"{output_uri}: is a file, not an output folder")
    inputs = list_inputs(input_uri)  # before anything is written: a bad input costs nothing
    out_fs.create_dir(out_root, recursive=True)
    _clean_stale(out_fs, out_root, run)

    done = published_ids(output_uri, model) if incremental else set()
    todo = [it for it in inputs.items if it["image_id"] not in done]
    seen, skipped = len(inputs.items), len(inputs.items) - len(todo)
    staging_path = _join(out_root, STAGING, run)
    staging_uri = _join(out_shown, STAGING, run)
    partition_path = _join(out_root, RUN_PREFIX + run)
    partition_uri = _join(out_shown, RUN_PREFIX + run)
    meta = {**model.columns(), "train_run_id": model.train_run_id, "infer_run_id": infer_run_id}

    written = failed = detections = 0
    failures: list[dict[str, str]] = []
    killed = False
    out_fs.create_dir(staging_path, recursive=True)
    t_pipe = time.perf_counter()
    try:
        if todo:
            if not ray.is_initialized():
                ray.init(ignore_reinit_error=True, include_dashboard=False)
            ctx = ray.data.DataContext.get_current()
            saved_progress = ctx.enable_progress_bars
            ctx.enable_progress_bars = bool(progress)
            try:
                ds = _build_dataset(inputs, todo, incremental, checkpoint, batch_size=batch_size,
                                    concurrency=concurrency, gpus_per_actor=gpus_per_actor,
                                    cpus_per_actor=cpus_per_actor, score_threshold=score_threshold)
                ds = ds.map_batches(_write_part, batch_size=int(rows_per_file), batch_format="numpy",
                                    num_cpus=0.25, fn_kwargs={"staging": staging_uri, "meta": meta})
                # Only the counts come back to the driver; closing the iterator early (a simulated
                # kill, an error) shuts the executor down, so no task writes into staging afterwards.
                counts = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
                try:
                    for batch in counts:
                        for k in range(len(batch["rows"])):
                            written += int(batch["rows"][k])
                            failed += int(batch["errors"][k])
                            detections += int(batch["detections"][k])
                            room = _MAX_FAILURES_IN_SUMMARY - len(failures)
                            if room > 0:
                                failures.extend(json.loads(batch["failures"][k])[:room])
                        if _fail_after is not None and written >= _fail_after:
                            killed = True
                            raise SimulatedKill(f"simulated kill after {written} detection rows were written to "
                                                f"staging {staging_uri}")
                finally:
                    getattr(counts, "close", lambda: None)()
            finally:
                ctx.enable_progress_bars = saved_progress
        t_done = time.perf_counter()
        parts, error_parts, staged_rows, staged_errors = _staged_files(out_fs, staging_path)
        if (staged_rows, staged_errors) != (written, failed):
            raise RuntimeError(f"{staging_uri}: holds {staged_rows} detection rows and {staged_errors} error rows, "
                               f"the run wrote {written} and {failed}; was the staging folder touched by another "
                               "run? Nothing published")
        if written + failed != len(todo):
            raise RuntimeError(f"{len(todo)} inputs to process, {written + failed} rows came back; nothing published")
        seconds = t_done - t_pipe
        summary = InferSummary(
            run=run, partition=partition_uri, infer_run_id=infer_run_id,
            model={**asdict(model), "key": model.key}, input=inputs.root, input_kind=inputs.kind,
            incremental=bool(incremental), seen=seen, new=len(todo), skipped=skipped, failed=failed,
            written=written, detections=detections, seconds=round(time.perf_counter() - t0, 3),
            images_per_s=len(todo) / seconds if seconds > 0 and todo else 0.0,
            started_at=started.isoformat(timespec="seconds"),
            finished_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            parts=parts, error_parts=error_parts, failures=failures)
        _publish(out_fs, staging_path, partition_path, parts + error_parts, summary.to_dict(), rename=_rename)
    except BaseException:
        if not killed:  # a real failure cleans up; a (simulated) kill leaves staging as a kill would
            try:
                out_fs.delete_dir(staging_path)
            except Exception:  # noqa: BLE001 - best effort; the next run deletes it anyway
                pass
        raise
    if progress:
        print(summary, flush=True)
    return summary


def _build_dataset(inputs: _Inputs, todo: list[dict[str, str]], incremental: bool, checkpoint: bytes, *,
                   batch_size: int, concurrency: int, gpus_per_actor: float, cpus_per_actor: float,
                   score_threshold: float | None):
    import ray

    if inputs.kind == "files":
        n_blocks = max(1, min(200, math.ceil(len(todo) / batch_size)))
        ds = ray.data.from_items([{k: it[k] for k in ("image_id", "fs_path", "path")} for it in todo],
                                 override_num_blocks=n_blocks)
        ds = ds.map_batches(_read_files, batch_size=batch_size, batch_format="numpy", num_cpus=0.25,
                            fn_kwargs={"root": inputs.root})
    else:
        fs, _ = resolve_filesystem(inputs.root)
        columns = [inputs.id_column, "image"] + (["path"] if inputs.id_column != "path" else [])
        schema_names = _table_columns(fs, inputs.table_files[0])
        columns = [c for c in columns if c in schema_names]
        keep = [it["image_id"] for it in todo] if incremental else None
        ds = ray.data.read_parquet(inputs.table_files, filesystem=fs).select_columns(columns)
        ds = ds.map_batches(_table_rows, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"id_column": inputs.id_column, "keep": keep})
    kwargs: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor:
        kwargs["num_gpus"] = gpus_per_actor
    return ds.map_batches(
        infer_predictor_class(),
        fn_constructor_kwargs={"checkpoint": checkpoint, "score_threshold": score_threshold,
                               "torch_threads": None if gpus_per_actor else max(1, int(cpus_per_actor))},
        batch_size=int(batch_size), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=int(concurrency)), **kwargs)


def _table_columns(fs: pafs.FileSystem, path: str) -> list[str]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        return pq.read_schema(f).names
