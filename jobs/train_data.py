"""The training data path: shards -> decoded rows -> each worker's batches.

Driver (:func:`prepare_data`): opens the precomputed shards, decodes JPEGs and densifies the
sparse anchor deltas in Ray Data tasks. When the decoded rows fit every node that may run a
worker (:func:`memory_plan`) they are decoded once, before training, into numpy blocks in the
object store (``Dataset.to_numpy_refs``) and every worker keeps all of them in memory: an epoch is
then a permutation of row indices, with no Ray Data execution to restart at each epoch boundary.
Otherwise the rows stream through Ray Train's ``get_dataset_shard``, re-read and re-decoded each
epoch.

Worker (:class:`WorkerData`): the same batches either way, as decoded numpy dicts
(``pipelines.schema.decode_batch``'s output) ready for ``to_model_inputs``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from frcnn import ModelConfig
from frcnn.config import TrainConfig
from pipelines.schema import decode_batch

log = logging.getLogger(__name__)

# Share of a node's object store, and of its memory for tasks, that the decoded rows may take.
MEMORY_BUDGET = 0.25


@dataclass(frozen=True)
class NodeRoom:
    """One Ray node: its object store and task memory (bytes), CPUs and GPUs."""

    object_store: float
    memory: float
    cpus: float
    gpus: float = 0.0

    def workers(self, total: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
        """How many of ``total`` workers this node can host (Ray may pack that many on it)."""
        fit = int(self.cpus // cpus_per_worker) if cpus_per_worker else total
        if gpus_per_worker:
            fit = min(fit, int(self.gpus // gpus_per_worker))
        return min(total, fit)


def memory_plan(need: float, nodes: list[NodeRoom], workers: int, cpus_per_worker: float, gpus_per_worker: float,
                budget: float = MEMORY_BUDGET) -> str | None:
    """Why the decoded rows (``need`` bytes) must stream, or None when they fit in memory.

    In memory, every node that hosts workers holds the blocks once in its object store (the
    workers' reads pull them there), and each worker joins its own copy of every row into its
    heap (``MemoryRows``). So each node that can host a worker must have ``need`` within
    ``budget`` of its object store, and ``need`` times the workers it may host within ``budget``
    of its task memory."""
    hosts = [(n, n.workers(workers, cpus_per_worker, gpus_per_worker)) for n in nodes]
    hosts = [(n, k) for n, k in hosts if k > 0] or [(n, 1) for n in nodes]
    if not hosts:
        return "no Ray node reports its memory"
    for node, k in hosts:
        if need > budget * node.object_store:
            return (f"{need / 1e9:.1f} GB decoded > {budget:.0%} of a node's object store "
                    f"({node.object_store / 1e9:.1f} GB)")
        if k * need > budget * node.memory:
            return (f"{k} worker(s) x {need / 1e9:.1f} GB decoded > {budget:.0%} of a node's memory "
                    f"({node.memory / 1e9:.1f} GB)")
    return None


def cluster_nodes() -> list[NodeRoom]:
    """The live Ray nodes' room (``ray.nodes()``: total resources per node)."""
    import ray

    return [NodeRoom(object_store=float(r.get("object_store_memory", 0)), memory=float(r.get("memory", 0)),
                     cpus=float(r.get("CPU", 0)), gpus=float(r.get("GPU", 0)))
            for r in (n["Resources"] for n in ray.nodes() if n.get("Alive"))]


@dataclass(frozen=True)
class WorkerShape:
    """The training group: how many workers and each one's CPUs and GPUs."""

    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0


def steps_per_epoch(rows: int, effective_batch: int) -> int:
    """Full batches only: every rank takes the same number of steps (DDP waits for all)."""
    return max(rows // effective_batch, 1)


@dataclass
class TrainData:
    manifest: dict[str, Any]
    rows: dict[str, int]
    datasets: dict[str, Any] = field(default_factory=dict)  # streamed through get_dataset_shard
    in_memory: dict[str, list] | None = None  # split -> numpy block refs, held by every worker


def _decode_fn(num_anchor_positions: int | dict[tuple[int, int], int]):
    def fn(batch):
        return decode_batch(batch, num_anchor_positions)
    return fn


def _positions(cfg: ModelConfig) -> int | dict[tuple[int, int], int]:
    """What ``decode_batch`` checks rows against: one count, or one per bucket."""
    return cfg.anchor_positions() if cfg.canvas.buckets else cfg.num_anchor_positions


def decoded_bytes_per_row(cfg: ModelConfig) -> int:
    """An upper bound: the largest canvas (bucket)."""
    return max(h * w * 3 + n * (1 + 16) + 4096 for (h, w), n in cfg.anchor_positions().items())


def bucket_batches(order: np.ndarray, bucket: np.ndarray, batch_size: int, steps: int | None
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows ``order`` (indices, in the order to use them), ``bucket`` the bucket of each row (by
    index) -> batches of ``batch_size`` indices, each of ONE bucket, in the order they fill up, and
    the rows left over. With ``steps``: exactly that many batches (fewer rows than that fill, the
    leftovers are topped up, then whole buckets cycled, with rows of their own bucket), so that
    every rank takes the same number of steps (DDP waits for all); without: only full batches."""
    buffers: dict[int, list[int]] = {}
    seen: dict[int, list[int]] = {}
    out: list[np.ndarray] = []
    for i in order.tolist():
        b = int(bucket[i])
        seen.setdefault(b, []).append(i)
        buf = buffers.setdefault(b, [])
        buf.append(i)
        if len(buf) == batch_size:
            out.append(np.asarray(buf, dtype=np.int64))
            buffers[b] = []
            if steps is not None and len(out) == steps:
                return out, np.zeros(0, np.int64)
    left = [i for buf in buffers.values() for i in buf]
    if steps is None or not seen:
        return out, np.asarray(left, dtype=np.int64)
    # Top up the largest leftovers first, then cycle through the buckets with the most rows.
    fills = sorted((buf for buf in buffers.values() if buf), key=len, reverse=True)
    fills += [[] for _ in range(steps)]
    by_size = sorted(seen, key=lambda b: -len(seen[b]))
    k = 0
    for buf in fills:
        if len(out) == steps:
            break
        b = int(bucket[buf[0]]) if buf else by_size[k % len(by_size)]
        k += 0 if buf else 1
        pool = seen[b]
        extra = [pool[j % len(pool)] for j in range(batch_size - len(buf))]
        out.append(np.asarray(buf + extra, dtype=np.int64))
    return out, np.zeros(0, np.int64)


def row_buckets(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Decoded rows (``decode_batch``'s ``canvas_height``/``canvas_width``) -> one int per canvas."""
    return columns["canvas_height"].astype(np.int64) * 100_000 + columns["canvas_width"].astype(np.int64)


def prepare_data(data: str, val_data: str | None, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 budget: float = MEMORY_BUDGET, shape: WorkerShape = WorkerShape()) -> TrainData:
    """Open (and refuse mismatched) shards, decode them in Ray Data, and decide memory vs stream
    (:func:`memory_plan` for ``shape``'s workers on the live nodes)."""
    import ray

    from pipelines.precompute import open_precomputed

    n_pos = _positions(model_cfg)
    train_ds, manifest = open_precomputed(data, model_cfg)
    datasets = {"train": train_ds.randomize_block_order(seed=train_cfg.seed).map_batches(
        _decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)}
    rows = {"train": int(manifest["rows"])}
    if val_data:
        val_ds, val_manifest = open_precomputed(val_data, model_cfg)
        datasets["val"] = val_ds.map_batches(_decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)
        rows["val"] = int(val_manifest["rows"])
    need = decoded_bytes_per_row(model_cfg) * sum(rows.values())
    why = memory_plan(need, cluster_nodes(), shape.workers, shape.cpus_per_worker, shape.gpus_per_worker, budget)
    if why is not None:
        log.info("streaming the training data: %s", why)
        return TrainData(manifest, rows, datasets=datasets)
    log.info("decoding the training data once (%.0f MB in the object store)", need / 1e6)
    in_memory = {k: ds.to_numpy_refs() for k, ds in datasets.items()}
    ray.wait([r for refs in in_memory.values() for r in refs], num_returns=sum(map(len, in_memory.values())))
    return TrainData(manifest, rows, in_memory=in_memory)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Join a column's blocks. A list column (boxes, labels) arrives as a 2-D array from a block
    whose rows happen to have equal lengths and as an object array otherwise: rows as objects."""
    if all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts)
    out = np.empty(sum(len(p) for p in parts), dtype=object)
    out[:] = [np.array(row) for p in parts for row in p]  # own, writable copies (not object-store views)
    return out


class MemoryRows:
    """Decoded rows held in this process: batches by row index."""

    def __init__(self, refs: list) -> None:
        import ray

        blocks = [b for b in ray.get(refs) if len(next(iter(b.values())))]
        self.columns = {k: _concat([np.asarray(b[k]) for b in blocks]) for k in blocks[0]}
        self.n = len(self.columns["image_id"])

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.columns.items()}


class WorkerData:
    """One worker's batches: its share of a fresh permutation each epoch (the same permutation on
    every rank, as torch's ``DistributedSampler`` does) when the rows are in memory, else its
    Ray Data shard."""

    def __init__(self, config: dict[str, Any], rank: int, world: int, tcfg: TrainConfig) -> None:
        import ray.train

        self.rank, self.world, self.tcfg = rank, world, tcfg
        # Several canvases: a batch holds rows of one bucket (one anchor grid, one image size).
        self.bucketed = bool(ModelConfig.from_dict(config["model"]).canvas.buckets)
        mem = config.get("in_memory")
        self.train = MemoryRows(mem["train"]) if mem else ray.train.get_dataset_shard("train")
        self.val = None
        if config.get("has_val"):
            self.val = MemoryRows(mem["val"]) if mem else ray.train.get_dataset_shard("val")

    def epoch(self, epoch: int, steps: int) -> Iterator[dict[str, Any]]:
        bs, tcfg = self.tcfg.batch_size, self.tcfg
        if isinstance(self.train, MemoryRows):
            order = np.random.default_rng((tcfg.seed, epoch)).permutation(self.train.n)[self.rank::self.world]
            if self.bucketed:
                for index in bucket_batches(order, row_buckets(self.train.columns), bs, steps)[0]:
                    yield self.train.take(index)
                return
            for i in range(min(steps, len(order) // bs)):
                yield self.train.take(order[i * bs:(i + 1) * bs])
            return
        if self.bucketed:
            yield from self._streamed_buckets(epoch, steps)
            return
        batches = self.train.iter_batches(
            batch_size=bs, batch_format="numpy", drop_last=True, prefetch_batches=tcfg.prefetch_batches,
            local_shuffle_buffer_size=bs * 8, local_shuffle_seed=tcfg.seed + epoch * 131 + self.rank)
        for i, batch in enumerate(batches):
            if i >= steps:
                break
            yield batch

    def _streamed_buckets(self, epoch: int, steps: int) -> Iterator[dict[str, Any]]:
        """The streamed shard regrouped by bucket: rows wait in a per-bucket buffer until a batch
        of one bucket is full; the last batches are topped up within their bucket (``bucket_batches``)."""
        bs, tcfg = self.tcfg.batch_size, self.tcfg
        chunks = self.train.iter_batches(
            batch_size=bs * 4, batch_format="numpy", prefetch_batches=tcfg.prefetch_batches,
            local_shuffle_buffer_size=bs * 8, local_shuffle_seed=tcfg.seed + epoch * 131 + self.rank)
        pending: dict[str, np.ndarray] | None = None
        done = 0
        for chunk in chunks:
            rows = chunk if pending is None else {k: _concat([pending[k], chunk[k]]) for k in chunk}
            n = len(rows["image_id"])
            full, left = bucket_batches(np.arange(n), row_buckets(rows), bs, None)
            for index in full[:steps - done]:
                yield _take(rows, index)
            done += min(len(full), steps - done)
            if done >= steps:
                return
            pending = _take(rows, left)
        if pending is not None and done < steps:
            n = len(pending["image_id"])
            if n == 0:  # every row went into full batches: repeat the last one
                pending = _take(rows, full[-1] if full else np.arange(len(rows["image_id"])))
                n = len(pending["image_id"])
            for index in bucket_batches(np.arange(n), row_buckets(pending), bs, steps - done)[0]:
                yield _take(pending, index)

    def validation(self) -> Iterator[dict[str, Any]]:
        bs = self.tcfg.batch_size
        if isinstance(self.val, MemoryRows):
            mine = np.arange(self.rank, self.val.n, self.world)
            if self.bucketed:  # every row once, in batches of one bucket
                full, left = bucket_batches(mine, row_buckets(self.val.columns), bs, None)
                groups = full + [left[row_buckets(self.val.columns)[left] == b]
                                 for b in np.unique(row_buckets(self.val.columns)[left])]
                for index in groups:
                    yield self.val.take(index)
                return
            for i in range(0, len(mine), bs):
                yield self.val.take(mine[i:i + bs])
            return
        if self.bucketed:
            for chunk in self.val.iter_batches(batch_size=bs, batch_format="numpy"):
                keys = row_buckets(chunk)
                for b in np.unique(keys):
                    yield _take(chunk, np.flatnonzero(keys == b))
            return
        yield from self.val.iter_batches(batch_size=bs, batch_format="numpy")


def _take(columns: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in columns.items()}
