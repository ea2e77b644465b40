"""``frcnn-jobs train``: Ray Train DistributedDataParallel training from precomputed shards,
tracked in MLflow.

    frcnn-jobs train --data runs/demo/trainval --val-data runs/demo/test --workers 2 --gpus-per-worker 0

How it fits together:
- the driver creates (or, with ``--resume``, reopens) the MLflow run and passes its id to the
  workers; rank 0 alone writes to it, so every restart of the worker group writes to the same run;
- ``TorchTrainer`` runs ``train_loop`` on each worker; each worker reads its shard of the Parquet
  rows (``get_dataset_shard``), draws a fresh anchor sample each step from the stored labels and
  flips canvases and their targets exactly; it never recomputes anchor targets;
- a checkpoint each epoch goes through ``ray.train.report``; a worker that dies makes Ray restart
  the group from the last one, and the loop skips the steps already logged;
- the driver logs the final and best checkpoints and registers the model (state dict + config,
  loaded with ``weights_only=True`` by a "model from code" pyfunc, see ``jobs/pyfunc_model.py``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from frcnn import LOSS_KEYS, FasterRCNN, ModelConfig, total_loss
from frcnn.training import (TrainConfig, autocast_dtype, build_optimizer, checkpoint_state, hflip_batch,
                            loss_mode, lr_factor)
from pipelines.schema import decode_batch, to_model_inputs
from pipelines.storage import init_ray

from . import options, tracking
from .models import CHECKPOINT_FILE

log = logging.getLogger(__name__)



class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_id: str
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


class _RankZeroLogger:
    """MLflow writes from rank 0, by run id, never raising: a tracking server that goes away
    mid-training produces warnings, not a dead training job."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._last: dict[str, int] = {}

    def last_step(self, key: str) -> int:
        """The last step logged for ``key``: after a restart the group redoes the steps after the
        last checkpoint, and those already in the run are not logged twice."""
        if key not in self._last:
            history = tracking.safe(self.client.get_metric_history, self.run_id, key) or []
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def log(self, metrics: dict[str, float], step: int, key: str) -> None:
        if step <= self.last_step(key):
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if math.isfinite(float(v))]
        tracking.safe(self.client.log_batch, self.run_id, metrics=batch)
        self._last[key] = step


def _to_device(images: torch.Tensor, targets: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    nb = device.type == "cuda"
    out = {
        "boxes": [b.to(device, non_blocking=nb) for b in targets["boxes"]],
        "labels": [l.to(device, non_blocking=nb) for l in targets["labels"]],
    }
    if "anchor_labels" in targets:
        out["anchor_labels"] = targets["anchor_labels"].to(device, non_blocking=nb)
        out["anchor_deltas"] = targets["anchor_deltas"].to(device, non_blocking=nb)
    return images.to(device, non_blocking=nb), out


def _steps_per_epoch(rows: int, effective_batch: int) -> int:
    """Full batches only: every rank takes the same number of steps (DDP waits for all)."""
    return max(rows // effective_batch, 1)


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


def _rank_weight_diff(core: torch.nn.Module, world: int) -> float:
    """Largest difference between ranks of per-parameter fingerprints (0.0: DDP kept the replicas
    identical). BatchNorm running statistics are buffers, updated from each rank's own batch, and
    are left out: the checkpoint holds rank 0's."""
    with torch.no_grad():
        fp = torch.stack([torch.stack((p.double().sum(), p.double().pow(2).sum())) for p in core.parameters()]).cpu()
    prints = _gather(fp, world)
    return float(max((a - prints[0]).abs().max() for a in prints))


def _validate(model: torch.nn.Module, core: FasterRCNN, shard, batch_size: int, use_difficult: bool,
              device: torch.device, world: int) -> dict[str, float]:
    """Validation loss and VOC mAP@0.5 (all-point) over this worker's shard, combined across ranks."""
    from frcnn.evaluation import evaluate_voc

    cfg = core.cfg
    loss_sum = torch.zeros(len(LOSS_KEYS) + 1, device=device)
    n_batches = torch.zeros(1, device=device)
    dets: dict[str, dict] = {}
    gts: dict[str, dict] = {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images, targets = to_model_inputs(batch, use_difficult)
        images, targets = _to_device(images, targets, device)
        with torch.no_grad(), loss_mode(core):
            losses = core(images, targets)
        loss_sum += torch.stack([losses[k].float() for k in LOSS_KEYS] + [total_loss(losses).float()])
        n_batches += 1
        scales = [float(s) for s in batch["scale"]]
        sizes = list(zip(batch["orig_height"].tolist(), batch["orig_width"].tolist()))
        for i, d in enumerate(core.detect(images, scales, sizes)):
            iid = str(batch["image_id"][i])
            dets[iid] = {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}
            gts[iid] = {
                "boxes": np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4) / scales[i],
                "labels": np.asarray(batch["labels"][i], dtype=np.int64),
                "difficult": np.asarray(batch["difficult"][i], dtype=bool),
            }
    totals = _all_reduce_mean(torch.cat([loss_sum, n_batches]), world)
    mean = (totals[:-1] / totals[-1].clamp(min=1e-9)).tolist()
    out = {f"val_{k}": v for k, v in zip(list(LOSS_KEYS) + ["loss_total"], mean)}
    all_dets, all_gts = {}, {}
    for part_d, part_g in _gather((dets, gts), world):
        all_dets.update(part_d)
        all_gts.update(part_g)
    names = list(cfg.class_names) or [f"class{i}" for i in range(1, cfg.num_classes + 1)]
    out["val_map50"] = float(evaluate_voc(all_dets, all_gts, names).map)
    return out


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
    device = ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed)  # identical initial weights (DDP also broadcasts rank 0's)

    model = FasterRCNN(mcfg)
    start_epoch, step, state = 0, 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    model = ray.train.torch.prepare_model(model)
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
    steps_per_epoch = _steps_per_epoch(config["train_rows"], effective_batch)
    total_steps = steps_per_epoch * tcfg.epochs
    use_difficult = bool(config.get("use_difficult", False))
    logger = _RankZeroLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    monitor = _start_system_metrics(config) if rank == 0 else None
    fail = config.get("_fail") or {}
    nan_at = config.get("_nan_at_step")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    window = torch.zeros(len(LOSS_KEYS) + 1, device=device)
    win_n, win_data, win_time, win_images = 0, 0.0, 0.0, 0
    nan_step = None
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, tcfg.epochs):
            model.train()
            batches = iter(train_shard.iter_batches(
                batch_size=tcfg.batch_size, batch_format="numpy", drop_last=True,
                prefetch_batches=tcfg.prefetch_batches, local_shuffle_buffer_size=tcfg.batch_size * 8,
                local_shuffle_seed=tcfg.seed + epoch * 131 + rank))
            for _ in range(steps_per_epoch):
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                images, targets = to_model_inputs(batch, use_difficult)
                t_data = time.perf_counter() - t0
                flip = torch.rand(images.shape[0]) < tcfg.hflip_prob
                images, targets = hflip_batch(images, targets, flip, mcfg)
                images, targets = _to_device(images, targets, device)
                for g in optimizer.param_groups:
                    g["lr"] = base_lr * lr_factor(step, total_steps, tcfg)
                with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                    losses = model(images, targets)
                loss = total_loss(losses)
                if nan_at is not None and step + 1 == nan_at:
                    loss = loss * float("nan")  # test-only switch
                stats = torch.stack([losses[k].detach().float() for k in LOSS_KEYS] + [loss.detach().float()])
                stats = _all_reduce_mean(stats, world)  # NaN anywhere -> NaN everywhere: all stop together
                if not bool(torch.isfinite(stats).all()):
                    nan_step = step + 1
                    break
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tcfg.grad_clip_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(core.parameters(), tcfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                if fail and rank == world - 1 and step == fail["step"] and not os.path.exists(fail["marker"]):
                    Path(fail["marker"]).write_text(f"killed at step {step}\n")  # test-only switch
                    os._exit(1)
                dt = time.perf_counter() - t0
                window += stats
                win_n += 1
                win_data += t_data
                win_time += dt
                win_images += images.shape[0] * world
                if logger is not None and (step % tcfg.log_every == 0 or step == total_steps):
                    vals = (window / win_n).tolist()
                    m = dict(zip(list(LOSS_KEYS) + ["loss_total"], vals))
                    m.update(lr=optimizer.param_groups[0]["lr"], images_per_s=win_images / win_time,
                             data_wait_frac=win_data / win_time, epoch=epoch)
                    logger.log(m, step, "loss_total")
                if step % tcfg.log_every == 0:
                    window.zero_()
                    win_n, win_data, win_time, win_images = 0, 0.0, 0.0, 0
            if nan_step is not None:
                break
            metrics = {"epoch": epoch, "step": step, "rank_weight_diff": _rank_weight_diff(core, world)}
            last = epoch == tcfg.epochs - 1
            checkpoint_now = (epoch + 1) % tcfg.checkpoint_every == 0 or last
            # A checkpoint always carries val_map50: the best-k policy ranks checkpoints by it.
            if val_shard is not None and ((epoch + 1) % tcfg.val_every == 0 or checkpoint_now):
                model.eval()
                metrics.update(_validate(model, core, val_shard, tcfg.batch_size, use_difficult, device, world))
                if logger is not None:
                    logger.log({k: v for k, v in metrics.items() if k.startswith("val_")}, step, "val_loss_total")
            if checkpoint_now:
                _report_with_checkpoint(metrics, core, optimizer, epoch, step, mcfg, tcfg, rank)
            else:
                ray.train.report(metrics)
        if nan_step is not None and rank == 0:
            # Stop without a new checkpoint: the last good one stays. Ray's result only carries the
            # metrics of checkpointed reports, so the driver learns of it from this status file.
            _write_status(config["status_uri"], {"nan_step": nan_step})
    finally:
        if monitor is not None:
            tracking.safe(monitor.finish)


def _write_status(uri: str, status: dict[str, Any]) -> None:
    import json

    from pipelines.voc import resolve_filesystem

    fs, path = resolve_filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(status).encode())


def _read_status(uri: str) -> dict[str, Any]:
    import json

    from pipelines.voc import resolve_filesystem

    fs, path = resolve_filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return {}


def _clear_status(uri: str) -> None:
    from pipelines.voc import resolve_filesystem

    fs, path = resolve_filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def _report_with_checkpoint(metrics, core, optimizer, epoch, step, mcfg, tcfg, rank) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(checkpoint_state(core, optimizer, epoch, step, mcfg, tcfg, metrics), Path(d) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"epoch-{epoch:04d}")


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


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


class _Progress:
    """Prints where a training is, every ``interval`` seconds, from the latest metrics rank 0 wrote
    to the MLflow run: the same on a laptop and on a cluster, whether or not Ray forwards the
    workers' output to the driver."""

    def __init__(self, uri: str, run_id: str, total_steps: int, epochs: int, interval: float = 30.0) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id
        self.total_steps, self.epochs, self.interval = total_steps, epochs, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def __enter__(self) -> "_Progress":
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        t0, first, last_step = time.monotonic(), None, None
        while not self._stop.wait(self.interval):
            try:
                latest = {m.key: (m.value, m.step) for m in self.client.get_run(self.run_id).data.to_proto().metrics}
            except Exception:  # noqa: BLE001 - a tracking server that does not answer: no line this time
                continue
            if "loss_total" not in latest:
                continue
            loss, step = latest["loss_total"]
            if step == last_step:
                continue
            now = time.monotonic()
            first = first or (now, step)
            rate = (step - first[1]) / (now - first[0]) if now > first[0] else 0.0
            parts = [f"train {_duration(now - t0)}: step {step}/{self.total_steps}",
                     f"epoch {int(latest.get('epoch', (0, 0))[0]) + 1}/{self.epochs}", f"loss_total {loss:.3f}"]
            if "images_per_s" in latest:
                parts.append(f"{latest['images_per_s'][0]:.1f} images/s")
            if "val_map50" in latest:
                parts.append(f"val_map50 {latest['val_map50'][0]:.3f} (step {latest['val_map50'][1]})")
            if rate > 0:
                parts.append(f"about {_duration((self.total_steps - step) / rate)} left")
            print(", ".join(parts), flush=True)
            last_step = step


def _duration(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _maybe_materialize(datasets: dict, rows: dict[str, int], cfg: ModelConfig, budget: float = 0.25) -> dict:
    """Decode once and keep the decoded rows in Ray's object store when they fit in ``budget`` of
    it: otherwise every epoch re-reads and re-decodes the shards, and the first batch of each
    epoch waits for that (benchmark row 6: data wait 8.1 % -> 3.5 % of the step time). Larger
    datasets stream as before."""
    import ray

    h, w = cfg.canvas.height, cfg.canvas.width
    per_row = h * w * 3 + cfg.num_anchor_positions * (1 + 16) + 4096  # image + labels + dense deltas
    need = per_row * sum(rows.values())
    store = ray.available_resources().get("object_store_memory", 0)
    if need > budget * store:
        log.info("streaming the training data: %.0f MB decoded > %.0f %% of the object store", need / 1e6, budget * 100)
        return datasets
    log.info("decoding the training data once (%.0f MB in the object store)", need / 1e6)
    return {k: ds.materialize() for k, ds in datasets.items()}


def _decode_fn(num_anchor_positions: int):
    def fn(batch):
        return decode_batch(batch, num_anchor_positions)
    return fn


def run_training(data: str, val_data: str | None = None, *, model_cfg: ModelConfig | None = None,
                 train_cfg: TrainConfig | None = None, workers: int = 1, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, experiment: str = tracking.DEFAULT_EXPERIMENT,
                 resume: str | None = None, address: str | None = None, storage_path: str | None = None,
                 model_name: str | None = "frcnn", tracking_uri: str | None = None, run_name: str | None = None,
                 progress_every: float = 30.0, _fail: dict | None = None,
                 _nan_at_step: int | None = None) -> TrainResult:
    """Train and track; returns the run id, checkpoint locations and final metrics. Every
    ``progress_every`` seconds a line says where the training is (step, epoch, loss, speed)."""
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.precompute import open_precomputed
    from pipelines.schema import read_manifest_at

    from .models import log_checkpoint, register_model

    train_cfg = train_cfg or TrainConfig()
    uri = tracking.setup(tracking_uri, experiment)
    manifest = read_manifest_at(data)
    model_cfg = model_cfg or ModelConfig.from_dict(manifest["model_config"])
    init_ray(address, workers * cpus_per_worker)
    train_ds, manifest = open_precomputed(data, model_cfg)
    n_pos = model_cfg.num_anchor_positions
    datasets = {"train": train_ds.randomize_block_order(seed=train_cfg.seed).map_batches(
        _decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)}
    rows = {"train": int(manifest["rows"])}
    if val_data:
        val_ds, val_manifest = open_precomputed(val_data, model_cfg)
        datasets["val"] = val_ds.map_batches(_decode_fn(n_pos), batch_size=train_cfg.batch_size * 4, num_cpus=0.5)
        rows["val"] = int(val_manifest["rows"])
    datasets = _maybe_materialize(datasets, rows, model_cfg)

    storage_path = storage_path or str(Path("ray_results").resolve())
    if resume:
        run = mlflow.get_run(resume)
        ray_name = run.data.tags.get("frcnn.ray_run_name")
        storage_path = run.data.tags.get("frcnn.storage_path", storage_path)
        if not ray_name:
            raise click.ClickException(f"run {resume} has no frcnn.ray_run_name tag: not a train run")
        active = mlflow.start_run(run_id=resume)
    else:
        active = mlflow.start_run(run_name=run_name)
        ray_name = f"train-{active.info.run_id}"
        mlflow.set_tags({"frcnn.job": "train", "frcnn.ray_run_name": ray_name, "frcnn.storage_path": storage_path,
                         "frcnn.data": data, "frcnn.val_data": val_data or "", "frcnn.config_hash": model_cfg.target_hash()})
        tracking.log_params({**model_cfg.flat("model"), **_flat("train", train_cfg.to_dict()),
                             "job.workers": workers, "job.gpus_per_worker": gpus_per_worker,
                             "job.effective_batch": workers * train_cfg.batch_size,
                             "job.lr": train_cfg.lr_for(workers * train_cfg.batch_size),
                             "job.train_rows": manifest["rows"], "job.data": data, "job.val_data": val_data})
    run_id = active.info.run_id
    print(f"MLflow run {run_id} (tracking {uri})", flush=True)

    status_uri = f"{storage_path.rstrip('/')}/{ray_name}/_frcnn_status.json"
    _clear_status(status_uri)
    loop_config = {
        "status_uri": status_uri,
        "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), "run_id": run_id, "tracking_uri": uri,
        "train_rows": int(manifest["rows"]), "has_val": bool(val_data),
        "use_difficult": bool(manifest.get("use_difficult", False)),
        "torch_threads": max(int(cpus_per_worker), 1) if gpus_per_worker == 0 else None,
        "_fail": _fail, "_nan_at_step": _nan_at_step,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_cfg.keep_checkpoints,
                checkpoint_score_attribute="val_map50" if val_data else None, checkpoint_score_order="max")),
        datasets=datasets,
    )
    steps_per_epoch = _steps_per_epoch(int(manifest["rows"]), workers * train_cfg.batch_size)
    try:
        with _Progress(uri, run_id, steps_per_epoch * train_cfg.epochs, train_cfg.epochs, progress_every):
            result = trainer.fit()
        metrics = dict(result.metrics or {})
        status = _read_status(status_uri)
        if "nan_step" in status:
            tracking.safe(mlflow.set_tag, "frcnn.nan_step", status["nan_step"])
            raise NonFiniteLoss(f"loss became NaN/Inf at step {status['nan_step']}; the last good checkpoint "
                                f"is {result.checkpoint.path if result.checkpoint else 'none (no epoch finished)'}")
        final = result.checkpoint
        best = final
        if val_data and result.best_checkpoints:
            best = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_map50", float("-inf")))[0]
        if final:
            log_checkpoint(final, "checkpoints/final")
        best_path = log_checkpoint(best, "checkpoints/best") if best else None
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                tracking.safe(mlflow.log_metric, f"final_{k}", float(v))
        version = None
        if model_name and best_path:
            version = register_model(best_path, model_name)
        mlflow.end_run("FINISHED")
    except BaseException:
        tracking.safe(mlflow.end_run, "FAILED")
        raise
    res = TrainResult(run_id, final.path if final else None, best.path if best else None, metrics, version)
    print(f"checkpoint: {res.checkpoint_path}\nbest checkpoint: {res.best_checkpoint_path}", flush=True)
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in sorted(metrics.items())), flush=True)
    if version:
        print(f"registered model: models:/{model_name}/{version}", flush=True)
    return res


def _flat(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def load_config_file(path: str | None) -> tuple[ModelConfig | None, dict]:
    """A YAML with a ``model:`` and/or ``train:`` section."""
    if not path:
        return None, {}
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    model = ModelConfig.from_dict(data["model"]) if "model" in data else None
    return model, dict(data.get("train") or {})


@click.command("train")
@click.option("--data", required=True, metavar="PRECOMPUTED", help="Precomputed shards (frcnn-jobs precompute --out).")
@click.option("--val-data", metavar="PRECOMPUTED", default=None, help="Validation shards: per-epoch loss and VOC mAP@0.5.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Ray Train workers (DDP ranks).")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True,
              help="GPUs per worker; 0 trains on CPU with gloo.")
@click.option("--cpus-per-worker", type=click.FloatRange(0.1), default=1, show_default=True)
@options.CONFIG
@click.option("--epochs", type=click.IntRange(1), default=None, help="Overrides train.epochs.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Per-worker batch; overrides train.batch_size.")
@click.option("--lr", type=float, default=None, help="Overrides train.base_lr (at train.lr_reference_batch).")
@options.EXPERIMENT
@click.option("--resume", metavar="RUN_ID", default=None, help="Continue a stopped train run from its last checkpoint.")
@options.ADDRESS
@click.option("--storage-path", metavar="URI", default=None,
              help="Ray Train checkpoints: a local folder (one machine) or an object store URI (clusters). "
                   "Default: ./ray_results.")
@click.option("--model-name", metavar="NAME", default="frcnn", show_default=True, help="Registered model name.")
@click.option("--progress-every", metavar="SECONDS", type=click.FloatRange(0), default=30, show_default=True,
              help="Seconds between progress lines (step, epoch, loss, speed, time left); 0: none.")
def train_cmd(data, val_data, workers, gpus_per_worker, cpus_per_worker, config_path, epochs, batch_size, lr,
              experiment, resume, address, storage_path, model_name, progress_every):
    """Train the detector with Ray Train DDP; prints the MLflow run id, checkpoint and metrics."""
    model_cfg, train_over = load_config_file(config_path)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("base_lr", lr)):
        if value is not None:
            train_over[key] = value
    train_cfg = TrainConfig.from_dict(train_over)
    try:
        run_training(data, val_data, model_cfg=model_cfg, train_cfg=train_cfg, workers=workers,
                     gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, experiment=experiment,
                     resume=resume, address=address, storage_path=storage_path, model_name=model_name,
                     progress_every=progress_every)
    except (NonFiniteLoss, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


COMMANDS = [train_cmd]
