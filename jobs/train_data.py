"""The training data path: shards -> decoded rows -> each worker's batches.

Driver (:func:`prepare_data`): opens the precomputed shards, decodes JPEGs and densifies the
sparse anchor deltas in Ray Data tasks. When the decoded rows fit in a quarter of Ray's object
store they are decoded once, before training, into numpy blocks in the object store
(``Dataset.to_numpy_refs``) and every worker keeps them in memory: an epoch is then a permutation
of row indices, with no Ray Data execution to restart at each epoch boundary (that restart cost
1.3-3.3 s an epoch here, a quarter of a small epoch). Larger data streams through Ray Train's
``get_dataset_shard`` as before, re-read and re-decoded each epoch.

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
from frcnn.training import TrainConfig
from pipelines.schema import decode_batch

log = logging.getLogger(__name__)

MEMORY_BUDGET = 0.25  # share of the object store the decoded rows may take to be held in memory


def steps_per_epoch(rows: int, effective_batch: int) -> int:
    """Full batches only: every rank takes the same number of steps (DDP waits for all)."""
    return max(rows // effective_batch, 1)


@dataclass
class TrainData:
    manifest: dict[str, Any]
    rows: dict[str, int]
    datasets: dict[str, Any] = field(default_factory=dict)  # streamed through get_dataset_shard
    in_memory: dict[str, list] | None = None  # split -> numpy block refs, held by every worker


def _decode_fn(num_anchor_positions: int):
    def fn(batch):
        return decode_batch(batch, num_anchor_positions)
    return fn


def decoded_bytes_per_row(cfg: ModelConfig) -> int:
    h, w = cfg.canvas.height, cfg.canvas.width
    return h * w * 3 + cfg.num_anchor_positions * (1 + 16) + 4096  # image + labels + dense deltas


def prepare_data(data: str, val_data: str | None, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 budget: float = MEMORY_BUDGET) -> TrainData:
    """Open (and refuse mismatched) shards, decode them in Ray Data, and decide memory vs stream."""
    import ray

    from pipelines.precompute import open_precomputed

    n_pos = model_cfg.num_anchor_positions
    train_ds, manifest = open_precomputed(data, model_cfg)
    datasets = {"train": train_ds.randomize_block_order(seed=train_cfg.seed).map_batches(
        _decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)}
    rows = {"train": int(manifest["rows"])}
    if val_data:
        val_ds, val_manifest = open_precomputed(val_data, model_cfg)
        datasets["val"] = val_ds.map_batches(_decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)
        rows["val"] = int(val_manifest["rows"])
    need = decoded_bytes_per_row(model_cfg) * sum(rows.values())
    store = ray.available_resources().get("object_store_memory", 0)
    if need > budget * store:
        log.info("streaming the training data: %.0f MB decoded > %.0f %% of the object store", need / 1e6, budget * 100)
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
        mem = config.get("in_memory")
        self.train = MemoryRows(mem["train"]) if mem else ray.train.get_dataset_shard("train")
        self.val = None
        if config.get("has_val"):
            self.val = MemoryRows(mem["val"]) if mem else ray.train.get_dataset_shard("val")

    def epoch(self, epoch: int, steps: int) -> Iterator[dict[str, Any]]:
        bs, tcfg = self.tcfg.batch_size, self.tcfg
        if isinstance(self.train, MemoryRows):
            order = np.random.default_rng((tcfg.seed, epoch)).permutation(self.train.n)[self.rank::self.world]
            for i in range(min(steps, len(order) // bs)):
                yield self.train.take(order[i * bs:(i + 1) * bs])
            return
        batches = self.train.iter_batches(
            batch_size=bs, batch_format="numpy", drop_last=True, prefetch_batches=tcfg.prefetch_batches,
            local_shuffle_buffer_size=bs * 8, local_shuffle_seed=tcfg.seed + epoch * 131 + self.rank)
        for i, batch in enumerate(batches):
            if i >= steps:
                break
            yield batch

    def validation(self) -> Iterator[dict[str, Any]]:
        bs = self.tcfg.batch_size
        if isinstance(self.val, MemoryRows):
            mine = np.arange(self.rank, self.val.n, self.world)
            for i in range(0, len(mine), bs):
                yield self.val.take(mine[i:i + bs])
            return
        yield from self.val.iter_batches(batch_size=bs, batch_format="numpy")
