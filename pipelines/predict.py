"""The one Ray Data prediction path, shared by ``frcnn-jobs infer`` and ``frcnn-jobs evaluate``.

    ds = ray.data.from_items([{"image_id": ..., "path": ..., "fs_path": ...}, ...])
    resources = PredictorResources(batch_size=8, concurrency=1, cpus_per_actor=2)  # the CLI's options
    ds = predict_dataset(ds, checkpoint_bytes, source=Location.of(root), resources=resources)
    # rows: PREDICTION_SCHEMA (pyarrow batches all the way: no pickled Python objects)

One stage: ``Predictor``. Each call reads its batch's files through the source's pyarrow
filesystem (``read_images``; a Parquet input already holds the bytes), decodes them and runs
``FasterRCNN.detect``; boxes come back in ORIGINAL pixels. Reading inside the predictor, not in
tasks of its own, saves a Ray task per batch, whose scheduling on a small machine cost more than
the read. An input that cannot be read or decoded is a row with ``error`` set (empty string: none),
never a dead job.

Where it runs:
- On CPU, Ray tasks, and each worker process keeps the last model it loaded (keyed by the
  checkpoint's digest and the settings, ``_detector``). Ray reuses its worker processes across the
  datasets of a driver, so the second evaluate or infer of a driver (the demo runs four) starts
  with torch imported and the model loaded; the first pays for both (most of
  it importing torch and torchvision), as an actor pool pays on every run: Ray
  Data starts and ends its actors per execution.
- On a GPU, an actor pool (Ray ends a worker after each GPU task, ``max_calls=1``, so a task could
  not keep its model). Each actor runs two calls at once: one decodes while the other holds the
  model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.runtime import driver_niceness, match_priority
from pipelines.storage import Location, read_bytes

__all__ = ["IMAGES_SCHEMA", "PREDICTION_SCHEMA", "Predictor", "PredictorResources", "file_items", "predict_batch",
           "predict_dataset", "predict_images", "read_images"]

# What the predictor takes: the id, where it came from, the encoded bytes, and why they could not
# be read ("" when they could).
IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("image", pa.binary()),
                           ("error", pa.string())])

PREDICTION_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("boxes", pa.list_(pa.float32())),  # N x 4 flattened, xyxy in the original image's pixels
    ("scores", pa.list_(pa.float32())),
    ("labels", pa.list_(pa.int32())),  # 1..C, the model's labels
    ("class_names", pa.list_(pa.string())),  # the model's name of each label
    ("category_ids", pa.list_(pa.int64())),  # the dataset's id of each label (COCO's; else the label)
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("error", pa.string()),  # "" when the image was read and decoded
])


_CALLS_PER_ACTOR = 2


@dataclass(frozen=True)
class PredictorResources:
    """What the predictors get, from the commands' ``--batch-size``, ``--concurrency``,
    ``--cpus-per-actor`` and ``--gpus-per-actor`` (same names): images per model call, predictors
    at once, and each one's CPUs and GPUs. The device follows the GPUs: none means CPU, even on a
    node with GPUs (Ray does not hide them from a predictor that asked for none)."""

    batch_size: int = 8
    concurrency: int = 1
    cpus_per_actor: float = 1
    gpus_per_actor: float = 0

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1 or int(self.concurrency) < 1 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(f"predictor resources {self}: batch_size and concurrency >= 1, cpus_per_actor > 0, "
                             "gpus_per_actor >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor else "cpu"

    @property
    def threads(self) -> int | None:
        """torch's threads in a CPU predictor (its CPUs); None on a GPU."""
        return None if self.gpus_per_actor else max(1, round(self.cpus_per_actor))

    def ray_options(self) -> dict[str, float]:
        """``num_cpus`` / ``num_gpus`` of one predictor for ``map_batches``."""
        return {"num_cpus": self.cpus_per_actor, **({"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {})}


def read_images(batch: pa.Table, *, source: Location) -> pa.Table:
    """(image_id, path, fs_path) -> IMAGES_SCHEMA, the bytes read from ``source``'s filesystem (a
    file that vanished or cannot be read becomes an error row). Runs inside ``Predictor``."""
    images, errors = [], []
    for fs_path in batch.column("fs_path").to_pylist():
        try:
            data = read_bytes(source.fs, fs_path)
            err = "" if data else "empty file (0 bytes)"
        except Exception as exc:  # noqa: BLE001 - an unreadable file is an error row, not a dead job
            data, err = b"", f"unreadable file: {type(exc).__name__}: {exc}"
        images.append(data)
        errors.append(err)
    return pa.table([batch.column("image_id"), batch.column("path"), pa.array(images, pa.binary()),
                     pa.array(errors, pa.string())], schema=IMAGES_SCHEMA)


def _lists(arrays: list[np.ndarray], dtype, pa_type: pa.DataType) -> pa.Array:
    """One list<pa_type> array from per-row 1-D arrays, built from offsets (no per-row objects)."""
    lengths = np.fromiter((a.size for a in arrays), np.int32, len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False) if arrays else \
        np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa_type))


# The detector this worker process loaded last: (key, Detector). One at a time, so a process
# that served several models holds only the newest.
_LOADED: list[tuple[tuple, Any]] = []


def _detector(checkpoint: bytes | tuple, digest: str | None, device: str, score_threshold: float | None,
              threads: int | None) -> Any:
    """The Detector for ``checkpoint`` on ``device``, loaded in this process once per (digest, settings)."""
    from frcnn.inference import Detector  # torch: loaded in the predictor, not in the write tasks

    key = (digest, device, score_threshold, threads)
    if digest is not None and _LOADED and _LOADED[0][0] == key:
        return _LOADED[0][1]
    _LOADED.clear()
    if isinstance(checkpoint, tuple):  # (ObjectRef,): see predict_dataset
        import ray

        checkpoint = ray.get(checkpoint[0])
    detector = Detector.from_checkpoint(checkpoint, device, score_threshold=score_threshold, threads=threads)
    if digest is not None:
        _LOADED.append((key, detector))
    return detector


class Predictor:
    """The Ray Data callable class: IMAGES_SCHEMA batches -> PREDICTION_SCHEMA batches."""

    def __init__(self, checkpoint: bytes | tuple, *, resources: PredictorResources = PredictorResources(),
                 source: Location | None = None, score_threshold: float | None = None, niceness: int | None = None,
                 digest: str | None = None, model_batch: int | None = None) -> None:
        self.model_batch = model_batch
        self.detector = _detector(checkpoint, digest, resources.device, score_threshold, resources.threads)
        self.names = pa.array(["?", *self.detector.class_names], pa.string())  # label k -> names[k]
        self.ids = pa.array([0, *self.detector.category_ids], pa.int64())  # label k -> ids[k]
        self.source = source
        self.niceness = niceness

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Calls run in pooled task workers, or on an actor's call threads (two at a time), not the
        # thread __init__ ran on: each takes the driver's priority, and the threads it starts inherit it.
        match_priority(self.niceness)
        if self.source is not None:  # rows name files (fs_path): read them here
            batch = read_images(batch, source=self.source)
        pre = [e or "" for e in batch.column("error").to_pylist()]
        images = batch.column("image").to_pylist()
        todo = [i for i, e in enumerate(pre) if not e]
        found = dict(zip(todo, self._predict([images[i] for i in todo])))
        boxes, scores, labels, heights, widths, errors = [], [], [], [], [], []
        for i, err in enumerate(pre):
            d = found.get(i)
            if d is None or d.error:
                err = err or (d.error if d is not None else "")
                boxes.append(np.zeros(0, np.float32))
                scores.append(np.zeros(0, np.float32))
                labels.append(np.zeros(0, np.int32))
                heights.append(-1)
                widths.append(-1)
            else:
                boxes.append(d.boxes)
                scores.append(d.scores)
                labels.append(d.labels)
                heights.append(d.height)
                widths.append(d.width)
            errors.append(err)
        label_lists = _lists(labels, np.int32, pa.int32())
        flat = label_lists.values.to_numpy(zero_copy_only=False)
        known = pa.array(np.where((flat > 0) & (flat < len(self.names)), flat, 0))
        names_values, id_values = self.names.take(known), self.ids.take(known)
        return pa.table([
            batch.column("image_id"), batch.column("path"),
            _lists(boxes, np.float32, pa.float32()), _lists(scores, np.float32, pa.float32()), label_lists,
            pa.ListArray.from_arrays(label_lists.offsets, names_values),
            pa.ListArray.from_arrays(label_lists.offsets, id_values),
            pa.array(heights, pa.int32()), pa.array(widths, pa.int32()), pa.array(errors, pa.string()),
        ], schema=PREDICTION_SCHEMA)


    def _predict(self, images: list[bytes]) -> list:
        """The detections of ``images`` through the model ``model_batch`` at a time (all at once
        without it): two threads, so one decodes the next batch while the other holds the model."""
        n = self.model_batch
        if not n or len(images) <= n:
            return self.detector.predict(images)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:
            parts = pool.map(self.detector.predict, [images[i:i + n] for i in range(0, len(images), n)])
            return [d for part in parts for d in part]


def predict_batch(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """The CPU task: ``Predictor(**kwargs)(batch)``, the model from this process's cache."""
    return Predictor(**kwargs)(batch)


# Four batches per task: a quarter of the tasks for Ray Data to schedule (each costs the driver
# CPU time), and still two tasks in flight per actor from 64 images on.
BATCHES_PER_BLOCK = 4


def file_items(items: list[dict[str, str]], batch_size: int) -> Any:
    """The dataset of file rows (image_id, path, fs_path) that :func:`predict_dataset` reads, cut
    into blocks of ``BATCHES_PER_BLOCK`` batches: a block is one actor task."""
    import ray

    n_blocks = max(1, min(200, math.ceil(len(items) / (batch_size * BATCHES_PER_BLOCK))))
    return ray.data.from_items(items, override_num_blocks=n_blocks)


def predict_dataset(ds: Any, checkpoint: bytes, *, source: Location | None,
                    resources: PredictorResources = PredictorResources(), score_threshold: float | None = None,
                    actors: bool | None = None, digest: str | None = None) -> Any:
    """Add the predict stage to ``ds``: rows holding ``fs_path`` on ``source``'s filesystem, or,
    without ``source``, rows following IMAGES_SCHEMA (a Parquet input). ``resources.concurrency``
    predictors at once, each with its CPUs (and as many torch threads on CPU) and GPUs; with GPUs an
    actor pool. ``actors``: an actor pool or tasks regardless of the device (default: actors on a
    GPU only; see the module's docstring). ``digest``: the checkpoint's sha256 when the caller has
    it already (computed otherwise)."""
    import ray

    # The checkpoint travels as a reference the predictor fetches, not as a (large) constructor
    # argument, which Ray stores in the object store and warns about for every restartable actor.
    ckpt = (ray.put(bytes(checkpoint)),)
    settings = {"checkpoint": ckpt, "resources": resources, "source": source, "score_threshold": score_threshold,
                "niceness": driver_niceness(), "digest": digest or hashlib.sha256(checkpoint).hexdigest()}
    batch, n = int(resources.batch_size), int(resources.concurrency)
    if not (bool(resources.gpus_per_actor) if actors is None else actors):
        # A call takes a task's block (BATCHES_PER_BLOCK model batches) and overlaps their decoding
        # with the model, as the actors' two concurrent calls do.
        return ds.map_batches(predict_batch, fn_kwargs={**settings, "model_batch": batch},
                              batch_size=batch * BATCHES_PER_BLOCK, batch_format="pyarrow", zero_copy_batch=True,
                              compute=ray.data.TaskPoolStrategy(size=n), **resources.ray_options())
    return ds.map_batches(
        Predictor, fn_constructor_kwargs=settings, batch_size=batch, batch_format="pyarrow", zero_copy_batch=True,
        # Two calls at once per actor: while one runs the model (under the Detector's lock), the
        # other decodes its batch on another core, so the model does not wait for decoding.
        compute=ray.data.ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=_CALLS_PER_ACTOR,
                                           enable_true_multi_threading=True),
        **resources.ray_options())


def predict_images(items: list[dict[str, str]], checkpoint: bytes, *, source: Location,
                   resources: PredictorResources = PredictorResources(), progress: bool = False, **kwargs: Any
                   ) -> pa.Table:
    """Predictions for ``items`` (image_id, path as shown, fs_path on ``source``'s filesystem),
    collected on the driver (PREDICTION_SCHEMA, in no particular order). ``kwargs``: the rest of
    :func:`predict_dataset`'s. ``progress``: a line about every 10 s."""
    import time

    if not items:
        return PREDICTION_SCHEMA.empty_table()
    ds = predict_dataset(file_items(items, resources.batch_size), checkpoint, source=source, resources=resources,
                         **kwargs)
    tables, done, t0 = [], 0, time.perf_counter()
    last = t0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(batch)
        done += batch.num_rows
        now = time.perf_counter()
        if progress and now - last >= 10.0:
            last = now
            print(f"predict {now - t0:.0f}s: {done}/{len(items)} images, {done / (now - t0):.1f} images/s", flush=True)
    return pa.concat_tables(tables).cast(PREDICTION_SCHEMA)
