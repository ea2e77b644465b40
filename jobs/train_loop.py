"""The per-worker training loop (``TorchTrainer``'s ``train_loop_per_worker``) and what it needs:
metric logging from rank 0, validation, checkpoints, and callbacks.

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

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frcnn import LOSS_KEYS, FasterRCNN, ModelConfig, total_loss
from frcnn.precision import autocast, autocast_dtype
from frcnn.training import (
    DDP_OPTIONS,
    TrainConfig,
    build_optimizer,
    checkpoint_state,
    hflip_batch,
    load_checkpoint,
    loss_mode,
    lr_factor,
    training_model,
)
from pipelines.runtime import match_priority
from pipelines.schema import to_model_inputs
from pipelines.storage import Location

from . import tracking
from .models import CHECKPOINT_FILE
from .train_data import WorkerData, steps_per_epoch
from .train_state import checkpoint_dir_name, write_status

log = logging.getLogger(__name__)

STAT_KEYS = (*LOSS_KEYS, "loss_total")


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


class RankZeroMetrics:
    """MLflow metrics from rank 0, by run id, through ``tracking.MetricBuffer``: a step only
    enqueues, a background thread writes, and a tracking server outage buffers instead of stopping
    the training.

    Steps at or below the last one already in the run (per ``key``) are not logged again: after a
    restart the group redoes the steps after the last checkpoint. The buffer writes in step order,
    so what a killed rank 0 did not write is a tail of steps, which the restarted group logs.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.buffer = tracking.MetricBuffer(run_id, tracking_uri)
        self.run_id = run_id
        self._last: dict[str, int] = {}

    def last_step(self, key: str) -> int:
        if key not in self._last:
            history = tracking.safe(self.buffer.client.get_metric_history, self.run_id, key) or []
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def log(self, metrics: dict[str, float], step: int, key: str) -> None:
        if step > self.last_step(key):
            self.buffer.log(metrics, step)
            self._last[key] = step

    def flush(self) -> None:
        self.buffer.flush()

    def close(self) -> None:
        self.buffer.close()


def _to_device(images: torch.Tensor, targets: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    nb = device.type == "cuda"
    out = {
        "boxes": [b.to(device, non_blocking=nb) for b in targets["boxes"]],
        "labels": [lb.to(device, non_blocking=nb) for lb in targets["labels"]],
    }
    if "anchor_labels" in targets:
        out["anchor_labels"] = targets["anchor_labels"].to(device, non_blocking=nb)
        out["anchor_deltas"] = targets["anchor_deltas"].to(device, non_blocking=nb)
    return images.to(device, non_blocking=nb), out


def _all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
        t = t / world
    return t


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rank_weight_diff(core: torch.nn.Module, world: int) -> float:
    """Largest difference between ranks of per-parameter fingerprints (0.0: DDP kept the replicas
    identical). BatchNorm running statistics are buffers, updated from each rank's own batch, and
    are left out: the checkpoint holds rank 0's."""
    with torch.no_grad():
        fp = torch.stack([torch.stack((p.double().sum(), p.double().pow(2).sum())) for p in core.parameters()]).cpu()
    prints = _gather(fp, world)
    return float(max((a - prints[0]).abs().max() for a in prints))


def validate(core: FasterRCNN, batches, use_difficult: bool, device: torch.device, world: int,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """Validation loss and VOC mAP@0.5 (all-point) over this worker's rows, combined across ranks,
    under the training step's autocast ``amp`` (detections stay float32)."""
    from frcnn.evaluation import evaluate_voc

    cfg = core.cfg
    loss_sum = torch.zeros(len(STAT_KEYS), device=device)
    n_batches = torch.zeros(1, device=device)
    dets: dict[str, dict] = {}
    gts: dict[str, dict] = {}
    for batch in batches:
        images, targets = _to_device(*to_model_inputs(batch, use_difficult), device)
        with torch.no_grad(), loss_mode(core), autocast(device, amp):
            losses = core(images, targets)
        loss_sum += torch.stack([losses[k].float() for k in LOSS_KEYS] + [total_loss(losses).float()])
        n_batches += 1
        scales = [float(s) for s in batch["scale"]]
        sizes = list(zip(batch["orig_height"].tolist(), batch["orig_width"].tolist(), strict=True))
        with autocast(device, amp):
            found = core.detect(images, scales, sizes)
        for i, d in enumerate(found):
            iid = str(batch["image_id"][i])
            dets[iid] = {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}
            gts[iid] = {
                "boxes": np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4) / scales[i],
                "labels": np.asarray(batch["labels"][i], dtype=np.int64),
                "difficult": np.asarray(batch["difficult"][i], dtype=bool),
            }
    totals = _all_reduce_mean(torch.cat([loss_sum, n_batches]), world)
    mean = (totals[:-1] / totals[-1].clamp(min=1e-9)).tolist()
    out = {f"val_{k}": v for k, v in zip(STAT_KEYS, mean, strict=True)}
    all_dets, all_gts = {}, {}
    for part_d, part_g in _gather((dets, gts), world):
        all_dets.update(part_d)
        all_gts.update(part_g)
    names = list(cfg.class_names) or [f"class{i}" for i in range(1, cfg.num_classes + 1)]
    out["val_map50"] = float(evaluate_voc(all_dets, all_gts, names).map)
    return out


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
        rows = _all_reduce_mean(torch.stack(self.pending), world).cpu().numpy()
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


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (``TorchTrainer``'s ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mcfg = ModelConfig.from_dict(config["model"])
    tcfg = TrainConfig.from_dict(config["train"])
    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    match_priority(config.get("driver_niceness"))
    device = ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed)  # identical initial weights (DDP also broadcasts rank 0's)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a few canvas shapes: each tuned once

    start_epoch, step = 0, 0
    state = _resume_state(ray.train.get_checkpoint(), config["status_folder"])
    model = training_model(mcfg, state, rank)  # backbone weights: rank 0 reads them, DDP broadcasts
    if state is not None:
        start_epoch, step = state["epoch"] + 1, state["step"]
    model = _wrap_ddp(model, tcfg)
    core: FasterRCNN = model.module if hasattr(model, "module") else model
    effective_batch = tcfg.batch_size * world
    base_lr = tcfg.lr_for(effective_batch)
    optimizer = build_optimizer(core, tcfg, base_lr)
    if state is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    # Sampling and flips differ per rank and per restart; the weights stay in sync through DDP.
    torch.manual_seed(tcfg.seed * 100003 + rank * 7919 + step)

    amp = autocast_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    per_epoch = steps_per_epoch(config["train_rows"], effective_batch)
    total_steps = per_epoch * tcfg.epochs
    use_difficult = bool(config.get("use_difficult", False))
    callbacks: list[TrainCallback] = list(config.get("callbacks") or [])
    writer = RankZeroMetrics(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if writer is not None and state is not None:
        # A group restarted after a lost worker (or a --resume) records where it picked up: one
        # point per restart in the run's "resumed_from_step" chart.
        writer.log({"resumed_from_step": float(step)}, step, "resumed_from_step")
    monitor = _start_system_metrics(config) if rank == 0 else None
    data = WorkerData(config, rank, world, tcfg)
    window = _Window()
    nan_step = None
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            model.train()
            batches = data.epoch(epoch, per_epoch)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                images, targets = to_model_inputs(batch, use_difficult)
                t_data = time.perf_counter() - t0
                flip = torch.rand(images.shape[0]) < tcfg.hflip_prob
                images, targets = _to_device(*hflip_batch(images, targets, flip, mcfg), device)
                for g in optimizer.param_groups:
                    g["lr"] = base_lr * lr_factor(step, total_steps, tcfg)
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    losses = model(images, targets)
                loss = total_loss(losses)
                window.add(torch.stack([losses[k].detach().float() for k in LOSS_KEYS] + [loss.detach().float()]),
                           step + 1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg.grad_clip_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(core.parameters(), tcfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                window.data_s += t_data
                window.time_s += time.perf_counter() - t0
                window.images += images.shape[0] * world
                for cb in callbacks:
                    cb.on_step(StepContext(rank, world, epoch, step, total_steps, core, optimizer))
                if step % tcfg.log_every == 0 or step == total_steps:
                    nan_step = window.check(world)
                    if nan_step is not None:
                        break
                    if writer is not None:
                        writer.log({**window.metrics(), "lr": optimizer.param_groups[0]["lr"], "epoch": epoch},
                                   step, "loss_total")
                    window.reset()
            # Nothing of this epoch is validated, reported or checkpointed before its losses are checked.
            nan_step = nan_step or window.check(world)
            if nan_step is not None:
                break
            metrics = {"epoch": epoch, "step": step, "rank_weight_diff": rank_weight_diff(core, world)}
            last = epoch == tcfg.epochs - 1
            checkpoint_now = (epoch + 1) % tcfg.checkpoint_every == 0 or last
            # A checkpoint always carries val_map50: the best-k policy ranks checkpoints by it.
            if data.val is not None and ((epoch + 1) % tcfg.val_every == 0 or checkpoint_now):
                model.eval()
                metrics.update(validate(core, data.validation(), use_difficult, device, world, amp))
                if writer is not None:
                    writer.log({k: v for k, v in metrics.items() if k.startswith("val_")}, step, "val_loss_total")
            if checkpoint_now:
                if writer is not None:
                    # Every step up to a checkpoint is in the run before the checkpoint exists: a
                    # group restarted (or resumed) from it logs only the steps after it.
                    writer.flush()
                _report_with_checkpoint(metrics, core, optimizer, epoch, step, mcfg, tcfg, rank)
            else:
                ray.train.report(metrics)
        if nan_step is not None and rank == 0:
            # Stop without a new checkpoint: the last good one stays.
            write_status(config["status_folder"], {"nan_step": nan_step})
    finally:
        if writer is not None:
            writer.close()
        if monitor is not None:
            tracking.safe(monitor.finish)


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
    2 s): a worker lost in between (seen here: a rank dying 5 steps after a checkpoint) restarts
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


def _start_system_metrics(config: dict[str, Any]):
    """CPU, memory (and GPU, where pynvml is present) of rank 0's node, into the same run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
        monitor = SystemMetricsMonitor(config["run_id"], sampling_interval=5, samples_before_logging=1)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are optional (psutil missing, ...)
        log.warning("system metrics disabled: %s", exc)
        return None
