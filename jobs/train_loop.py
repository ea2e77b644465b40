"""The per-worker training loop (``TorchTrainer``'s ``train_loop_per_worker``): its config, set-up,
steps, checkpoints and callbacks. Validation and early stopping are in ``jobs.train_eval``, the
metric names and rank 0's MLflow writer in ``jobs.train_metrics``.

Each step: a batch of decoded rows (``jobs.train_data``), a fresh anchor sample from the stored
labels, an exact flip of half the canvases with their targets, forward, backward, SGD. Nothing in
a step waits for the host: the losses stay on the device and are checked for NaN/Inf, reduced
across ranks and logged once per logging window (``train.log_every`` steps) and at the end of each
epoch. A non-finite loss is found at the next check, named by its own step, and nothing computed
after it is logged or checkpointed. MLflow writes go through a background thread.

Callbacks (``run_training(..., callbacks=[...])``) are :class:`TrainCallback` objects pickled to
every worker; ``on_step`` runs after each optimizer step with a :class:`StepContext`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frcnn import LOSS_KEYS, FasterRCNN, ModelConfig, total_loss
from frcnn.precision import autocast_dtype
from frcnn.training import (
    DDP_OPTIONS,
    TrainConfig,
    build_optimizer,
    checkpoint_state,
    hflip_batch,
    load_checkpoint,
    lr_factor,
    training_model,
)
from pipelines.runtime import match_priority
from pipelines.schema import to_model_inputs
from pipelines.storage import Location

from . import tracking
from .models import CHECKPOINT_FILE
from .train_data import WorkerData, steps_per_epoch
from .train_eval import STAT_KEYS, EarlyStop, all_reduce_mean, rank_weight_diff, to_device, validate
from .train_metrics import PERF, TRAIN, VAL, RankZeroMetrics, start_system_metrics, train_metrics, val_metrics
from .train_state import checkpoint_dir_name, write_status

log = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a callback sees after an optimizer step. ``model`` is the bare detector (not the DDP
    wrapper); changing its parameters changes the next step."""

    rank: int
    world_size: int
    epoch: int
    step: int  # steps done so far, 1-based, counted across restarts
    total_steps: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


class TrainCallback:
    """Hooks into every worker's loop. Subclass, override what you need, and pass instances as
    ``run_training(..., callbacks=[...])``; they are pickled to the workers, so keep them small."""

    def on_step(self, ctx: StepContext) -> None:
        """After each optimizer step, on every rank."""


class _Window:
    """Per-step loss statistics kept on the device until the next check, then reduced across
    ranks in one collective and copied to the host once."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []
        self.first_step = 0  # step number of pending[0]
        self.sum = np.zeros(len(STAT_KEYS))
        self.n, self.data_s, self.time_s, self.images = 0, 0.0, 0.0, 0

    def add(self, stats: torch.Tensor, step: int) -> None:
        if not self.pending:
            self.first_step = step
        self.pending.append(stats)

    def check(self, world: int) -> int | None:
        """The first step whose loss is NaN/Inf on any rank, else None (and the window grows)."""
        if not self.pending:
            return None
        rows = all_reduce_mean(torch.stack(self.pending), world).cpu().numpy()
        self.pending = []
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            return self.first_step + int(np.argmax(bad))
        self.sum += rows.sum(axis=0)
        self.n += len(rows)
        return None

    def metrics(self) -> dict[str, float]:
        m = dict(zip(STAT_KEYS, (self.sum / max(self.n, 1)).tolist(), strict=True))
        t = max(self.time_s, 1e-9)
        m.update(images_per_s=self.images / t, data_wait_frac=self.data_s / t)
        return m

    def reset(self) -> None:
        self.sum[:] = 0
        self.n, self.data_s, self.time_s, self.images = 0, 0.0, 0.0, 0


@dataclass(frozen=True)
class LoopConfig:
    """What every worker's loop is given. Ray Train passes ``train_loop_config`` as a plain dict:
    the driver builds it with :meth:`to_dict`, each worker reads it back with :meth:`from_dict`
    (keys it does not know are left to the modules that read them, such as ``jobs.train_data``)."""

    model: ModelConfig
    train: TrainConfig
    run_id: str  # the MLflow run rank 0 writes to
    tracking_uri: str
    status_folder: str  # where rank 0 leaves the outcome for the driver (jobs.train_state)
    train_rows: int
    has_val: bool = False
    use_difficult: bool = False
    torch_threads: int | None = None
    driver_niceness: int | None = None
    callbacks: tuple[TrainCallback, ...] = ()

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LoopConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"model", "train", "callbacks"}
        return cls(model=ModelConfig.from_dict(config["model"]), train=TrainConfig.from_dict(config["train"]),
                   callbacks=tuple(config.get("callbacks") or ()),
                   **{k: v for k, v in config.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "model": self.model.to_dict(), "train": self.train.to_dict(), "callbacks": list(self.callbacks)}


@dataclass
class _Worker:
    """One worker's training state between the loop's steps."""

    cfg: LoopConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the DDP wrapper (or the bare model with one worker)
    core: FasterRCNN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lr: float
    per_epoch: int
    start_epoch: int
    step: int
    data: WorkerData
    early: EarlyStop
    writer: RankZeroMetrics | None = None
    monitor: Any = None
    window: _Window = dataclasses.field(default_factory=lambda: _Window())

    @property
    def total_steps(self) -> int:
        return self.per_epoch * self.cfg.train.epochs


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (``TorchTrainer``'s ``train_loop_per_worker``): set up, then per epoch
    train, check the losses, validate, report or checkpoint; the outcome goes to the status file."""
    w = _set_up(LoopConfig.from_dict(config), config)
    outcome: dict[str, Any] = {}
    try:
        for epoch in range(w.start_epoch, w.cfg.train.epochs):
            nan_step = _train_epoch(w, epoch)
            if nan_step is not None:  # stop without a new checkpoint: the last good one stays
                outcome = {"nan_step": nan_step}
                break
            if _end_epoch(w, epoch):
                outcome = {"early_stop": {**w.early.metrics(), "epoch": epoch, "reason": w.early.reason()}}
                break
        if outcome and w.rank == 0:
            write_status(w.cfg.status_folder, outcome)
    finally:
        if w.writer is not None:
            w.writer.close()
        if w.monitor is not None:
            tracking.safe(w.monitor.finish)


def _set_up(cfg: LoopConfig, config: dict[str, Any]) -> _Worker:
    """Model, optimizer and data of this worker, continued from the latest checkpoint if any."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = cfg.train
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    match_priority(cfg.driver_niceness)
    device = ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed)  # identical initial weights (DDP also broadcasts rank 0's)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few canvas shapes: each tuned once
    state = _resume_state(ray.train.get_checkpoint(), cfg.status_folder)
    model = training_model(cfg.model, state, rank)  # backbone weights: rank 0 reads them, DDP broadcasts
    model = _wrap_ddp(model, tcfg)
    core: FasterRCNN = model.module if hasattr(model, "module") else model
    base_lr = tcfg.lr_for(tcfg.batch_size * world)
    optimizer = build_optimizer(core, tcfg, base_lr)
    if state is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    step = state["step"] if state is not None else 0
    # Sampling and flips differ per rank and per restart; the weights stay in sync through DDP.
    torch.manual_seed(tcfg.seed * 100003 + rank * 7919 + step)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype(tcfg.amp, device) == torch.float16)
    w = _Worker(cfg, rank, world, device, model, core, optimizer, scaler, base_lr,
                steps_per_epoch(cfg.train_rows, tcfg.batch_size * world), state["epoch"] + 1 if state else 0, step,
                WorkerData(config, rank, world, tcfg),
                EarlyStop.resume(tcfg.early_stop_patience, state and state.get("metrics")))
    if rank == 0:
        w.writer = RankZeroMetrics(cfg.tracking_uri, cfg.run_id)
        w.monitor = start_system_metrics(cfg.tracking_uri, cfg.run_id)
        if state is not None:
            # A group restarted after a lost worker (or a --resume) records where it picked up: one
            # point per restart in the run's system/perf/resumed_from_step chart.
            w.writer.log({PERF + "resumed_from_step": float(step)}, step, PERF + "resumed_from_step")
    return w


def _train_epoch(w: _Worker, epoch: int) -> int | None:
    """One epoch of steps; the first step with a non-finite loss, else None. The losses are
    checked (and logged) every ``train.log_every`` steps and at the end of the epoch."""
    tcfg = w.cfg.train
    w.model.train()
    batches = w.data.epoch(epoch, w.per_epoch)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        _train_step(w, batch, time.perf_counter() - t0, t0)
        for cb in w.cfg.callbacks:
            cb.on_step(StepContext(w.rank, w.world, epoch, w.step, w.total_steps, w.core, w.optimizer))
        if w.step % tcfg.log_every == 0 or w.step == w.total_steps:
            nan_step = w.window.check(w.world)
            if nan_step is not None:
                return nan_step
            if w.writer is not None:
                w.writer.log(train_metrics(w.window.metrics(), w.optimizer.param_groups[0]["lr"], epoch),
                             w.step, TRAIN + "loss_total")
            w.window.reset()
    # Nothing of this epoch is validated, reported or checkpointed before its losses are checked.
    return w.window.check(w.world)


def _train_step(w: _Worker, batch: dict[str, Any], t_data: float, t0: float) -> None:
    """Forward, backward and an SGD step on one batch (flipped at random, with its targets)."""
    tcfg, mcfg = w.cfg.train, w.cfg.model
    images, targets = to_model_inputs(batch, w.cfg.use_difficult)
    flip = torch.rand(images.shape[0]) < tcfg.hflip_prob
    images, targets = to_device(*hflip_batch(images, targets, flip, mcfg), w.device)
    for g in w.optimizer.param_groups:
        g["lr"] = w.base_lr * lr_factor(w.step, w.total_steps, tcfg)
    amp = autocast_dtype(tcfg.amp, w.device)
    with torch.autocast(w.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        losses = w.model(images, targets)
    loss = total_loss(losses)
    w.window.add(torch.stack([losses[k].detach().float() for k in LOSS_KEYS] + [loss.detach().float()]), w.step + 1)
    w.optimizer.zero_grad(set_to_none=True)
    w.scaler.scale(loss).backward()
    if tcfg.grad_clip_norm > 0:
        w.scaler.unscale_(w.optimizer)
        torch.nn.utils.clip_grad_norm_(w.core.parameters(), tcfg.grad_clip_norm)
    w.scaler.step(w.optimizer)
    w.scaler.update()
    w.step += 1
    w.window.data_s += t_data
    w.window.time_s += time.perf_counter() - t0
    w.window.images += images.shape[0] * w.world


def _end_epoch(w: _Worker, epoch: int) -> bool:
    """Validate (when due), then report to Ray Train, with a checkpoint when due; True when early
    stopping ends the run here (its epoch is checkpointed)."""
    tcfg = w.cfg.train
    metrics: dict[str, Any] = {"epoch": epoch, "step": w.step, "rank_weight_diff": rank_weight_diff(w.core, w.world)}
    checkpoint_now = (epoch + 1) % tcfg.checkpoint_every == 0 or epoch == tcfg.epochs - 1
    stop = False
    # A checkpoint always carries val_map50: the best-k policy ranks checkpoints by it.
    if w.data.val is not None and ((epoch + 1) % tcfg.val_every == 0 or checkpoint_now):
        w.model.eval()
        amp = autocast_dtype(tcfg.amp, w.device)
        metrics.update(validate(w.core, w.data.validation(), w.cfg.use_difficult, w.device, w.world, amp))
        stop = w.early.update(metrics["val_map50"], epoch)
        checkpoint_now = checkpoint_now or stop
        if w.writer is not None:
            w.writer.log(val_metrics(metrics), w.step, VAL + "loss_total")
        metrics.update(w.early.metrics())
    if w.writer is not None:
        w.writer.log({PERF + "rank_weight_diff": metrics["rank_weight_diff"]}, w.step, PERF + "rank_weight_diff")
    if checkpoint_now:
        if w.writer is not None:
            # Every step up to a checkpoint is in the run before the checkpoint exists: a
            # group restarted (or resumed) from it logs only the steps after it.
            w.writer.flush()
        _report_with_checkpoint(metrics, w.core, w.optimizer, epoch, w.step, w.cfg.model, tcfg, w.rank)
    else:
        import ray.train

        ray.train.report(metrics)
    return stop


def _wrap_ddp(model: FasterRCNN, tcfg: TrainConfig) -> torch.nn.Module:
    """DDP for more than one rank (``frcnn.training.DDP_OPTIONS``; the bare model for one);
    ``train.grad_compression: bf16`` all-reduces the gradients in bfloat16."""
    import ray.train.torch

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=dict(DDP_OPTIONS))
    if tcfg.grad_compression == "bf16" and hasattr(model, "register_comm_hook"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return model


def _resume_state(registered, folder: str) -> dict[str, Any] | None:
    """The checkpoint state a (re)started group continues from, or None to start at step 0.

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    2 s): a worker lost in between (a rank dying a few steps after a checkpoint) restarts
    the group from the previously registered one, or from scratch, although the newer checkpoint is
    complete in storage. So the newest complete ``epoch-NNNN`` folder of the run wins when it is
    later than Ray's; one that does not load (cut short) falls back to Ray's.
    """
    import io

    from .train_state import checkpoint_epoch, latest_checkpoint

    newest = latest_checkpoint(folder, CHECKPOINT_FILE)
    if newest is not None and registered is not None and \
            (checkpoint_epoch(newest) or -1) <= (checkpoint_epoch(registered.path) or -1):
        newest = None
    if newest is not None:
        try:
            return load_checkpoint(io.BytesIO(Location.of(newest).child(CHECKPOINT_FILE).read_bytes()))
        except Exception as exc:  # noqa: BLE001 - a copy cut short: Ray's registered checkpoint instead
            log.warning("%s: cannot load (%s); using the checkpoint Ray Train registered", newest, exc)
    if registered is None:
        return None
    with registered.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def _report_with_checkpoint(metrics, core, optimizer, epoch, step, mcfg, tcfg, rank) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(checkpoint_state(core, optimizer, epoch, step, mcfg, tcfg, metrics), Path(d) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name(epoch))
