"""``frcnn-jobs train``: Ray Train DistributedDataParallel training from precomputed shards,
tracked in MLflow.

    frcnn-jobs train --data runs/demo/shards/train --val-data runs/demo/shards/val --workers 2

How it fits together:
- the driver decodes the shards (``jobs/train_data.py``), creates (or, with ``--resume``, reopens)
  the MLflow run named ``train-<backbone>-<dataset>-<N>w`` and passes its id to the workers; rank
  0 alone writes to it, so every restart of the worker group writes to the same run;
- ``TorchTrainer`` runs ``jobs.train_loop.train_loop`` on each worker; a checkpoint each
  ``train.checkpoint_every`` epochs goes through ``ray.train.report``; a worker that dies makes Ray
  restart the group from the last one, and the loop skips the steps already logged;
- the driver prints progress lines from the MLflow run (``jobs/progress.py``), logs the final and
  best checkpoints and registers the model (state dict + config, loaded with ``weights_only=True``
  by a "model from code" pyfunc, see ``jobs/pyfunc_model.py``);
- Ctrl-C or SIGTERM stops the workers, marks the run KILLED, and prints the step reached, the last
  checkpoint and the ``--resume`` command; the command exits 130 (143 for SIGTERM);
- a run holds a lease (``pipelines/lease.py``) beside its Ray Train folder while it lives: a
  ``--resume`` of it is refused, naming the live attempt, until that attempt ends.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from frcnn import ModelConfig
from frcnn.config import load_config
from frcnn.errors import JobError
from frcnn.overrides import Overrides
from frcnn.training import TrainConfig
from frcnn.typed_config import flatten
from pipelines.runtime import driver_niceness, init_ray

from . import console, options, tracking
from .models import CHECKPOINT_FILE
from .progress import Progress
from .train_data import WorkerShape, prepare_data, steps_per_epoch
from .train_loop import StepContext, TrainCallback, train_loop
from .train_metrics import TRAIN
from .train_state import checkpoint_step, clear_status, latest_checkpoint, read_status, run_folder

__all__ = ["NonFiniteLoss", "StepContext", "TrainCallback", "TrainResult", "TrainingInterrupted", "run_training"]


class NonFiniteLoss(JobError, RuntimeError):
    """Training diverged: a loss that is not finite (the message names the step and the last good checkpoint)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the workers were stopped and the MLflow run marked KILLED."""

    def __init__(self, run_id: str, step: int | None, total_steps: int, checkpoint: str | None) -> None:
        super().__init__(f"training interrupted at step {step}")
        self.run_id, self.step, self.total_steps, self.checkpoint = run_id, step, total_steps, checkpoint


@dataclass
class TrainResult:
    run_id: str
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None


def dataset_label(manifest: dict[str, Any]) -> str:
    """A short name of the training data for the run name: ``synth`` for the generated shapes,
    ``voc2007+2012`` for VOC years."""
    from pipelines.synth import SYNTH_CLASSES

    name = str(manifest.get("dataset") or "data")
    if name == "voc" and list(manifest.get("class_names") or []) == list(SYNTH_CLASSES):
        return "synth"
    years = manifest.get("years")
    return name + ("+".join(map(str, years)) if years else "")


def _last_logged_step(uri: str, run_id: str) -> int | None:
    from mlflow.tracking import MlflowClient

    history = tracking.safe(MlflowClient(uri).get_metric_history, run_id, TRAIN + "loss_total") or []
    return max((m.step for m in history), default=None)


def _fit(trainer) -> Any:
    """``trainer.fit()``, stoppable with Ctrl-C.

    ``fit`` runs in a helper thread and the main thread waits for it, so a Ctrl-C arrives here as
    ``KeyboardInterrupt`` (in the main thread, Ray Train would install its own SIGINT handler,
    whose abort ends the driver with exit status 1 before anything else can run). On an interrupt
    the driver leaves Ray: the trainer's controller and its workers are the driver's actors and
    stop with it (on a cluster too); a locally started Ray stops entirely. What the workers
    checkpointed stays.
    """
    import ray

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


@dataclass(frozen=True)
class TrainJob:
    """Where and how a training runs (everything but the data and the configs)."""

    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    experiment: str = tracking.DEFAULT_EXPERIMENT
    address: str | None = None
    storage_path: str | None = None
    model_name: str | None = "frcnn"
    tracking_uri: str | None = None
    run_name: str | None = None
    progress_every: float = 30.0
    callbacks: tuple[TrainCallback, ...] = ()


@dataclass(frozen=True)
class _Setup:
    """A training about to start: its configs, data and where its run and checkpoints live."""

    uri: str
    data: str
    val_data: str | None
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    prepared: Any  # jobs.train_data.TrainData
    effective_batch: int
    storage_path: str
    run_name: str | None
    tags: dict[str, Any]
    params: dict[str, Any]


def run_training(data: str, val_data: str | None = None, *, model_cfg: ModelConfig | None = None,
                 train_cfg: TrainConfig | None = None, workers: int = 1, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, experiment: str = tracking.DEFAULT_EXPERIMENT,
                 resume: str | None = None, address: str | None = None, storage_path: str | None = None,
                 model_name: str | None = "frcnn", tracking_uri: str | None = None, run_name: str | None = None,
                 progress_every: float = 30.0, callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Train and track; returns the run id, checkpoint locations and final metrics. Every
    ``progress_every`` seconds a line says where the training is (step, epoch, loss, speed).
    ``callbacks`` (:class:`TrainCallback`) run inside every worker's loop. ``resume`` (a run id)
    is refused (``LeaseHeld``) while another attempt of that run is alive."""
    job = TrainJob(workers, gpus_per_worker, cpus_per_worker, experiment, address, storage_path, model_name,
                   tracking_uri, run_name, progress_every, tuple(callbacks))
    uri = tracking.setup(tracking_uri, experiment)
    storage = _storage_path(uri, job, resume)
    held = _hold_run(storage, resume) if resume else None  # before anything starts, the run reopened last
    try:
        setup = _setup(data, val_data, model_cfg, train_cfg or TrainConfig(), job, uri, storage, resume)
        with tracking.job_run("train", run_name=setup.run_name, experiment=experiment, tags=setup.tags,
                              params=setup.params, run_id=resume, tracking_uri=uri) as active:
            run_id = active.info.run_id
            held = held or _hold_run(storage, run_id)
            res = _finish(*_train(setup, job, run_id, resumed=bool(resume)), setup, job, run_id)
    finally:
        if held is not None:
            _let_go(held)
    _print_result(res, job.model_name)
    return res


def _storage_path(uri: str, job: TrainJob, resume: str | None) -> str:
    """Where Ray Train keeps the run's checkpoints: a resumed run's own, else ``--storage-path``."""
    from mlflow.tracking import MlflowClient

    default = job.storage_path or str(Path("ray_results").resolve())
    if not resume:
        return default
    prior = MlflowClient(uri).get_run(resume).data.tags
    if not prior.get("frcnn.ray_run_name"):
        raise click.ClickException(f"run {resume} has no frcnn.ray_run_name tag: not a train run")
    return prior.get("frcnn.storage_path", default)


def _setup(data: str, val_data: str | None, model_cfg: ModelConfig | None, train_cfg: TrainConfig, job: TrainJob,
           uri: str, storage_path: str, resume: str | None) -> _Setup:
    """Read the data, start Ray, and work out the run's tags and params."""
    from pipelines.schema import read_manifest_at

    manifest = read_manifest_at(data)
    model_cfg = model_cfg or ModelConfig.from_dict(manifest["model_config"])
    if (manifest.get("category_ids") and not model_cfg.category_ids
            and list(model_cfg.class_names) == list(manifest["class_names"])):  # the dataset's ids, kept in the model
        model_cfg = model_cfg.replace(category_ids=tuple(manifest["category_ids"]))
    init_ray(job.address, job.workers * job.cpus_per_worker, log_to_driver=console.log_to_driver())
    console.quiet_ray()
    prepared = prepare_data(data, val_data, model_cfg, train_cfg,
                            shape=WorkerShape(job.workers, job.cpus_per_worker, job.gpus_per_worker))
    batch = job.workers * train_cfg.batch_size
    if resume:
        return _Setup(uri, data, val_data, model_cfg, train_cfg, prepared, batch, storage_path, None, {}, {})
    manifest = prepared.manifest
    run_name = job.run_name or tracking.train_run_name(model_cfg.backbone.name, dataset_label(manifest), job.workers)
    tags = {"frcnn.storage_path": storage_path, "frcnn.data": data, "frcnn.val_data": val_data or "",
            "frcnn.config_hash": model_cfg.target_hash()}
    params = {**model_cfg.flat("model"), **flatten(train_cfg.to_dict(), "train"),
              "job.workers": job.workers, "job.gpus_per_worker": job.gpus_per_worker, "job.effective_batch": batch,
              "job.lr": train_cfg.lr_for(batch), "job.train_rows": manifest["rows"], "job.data": data,
              "job.val_data": val_data}
    return _Setup(uri, data, val_data, model_cfg, train_cfg, prepared, batch, storage_path, run_name, tags, params)


def _let_go(held: Any) -> None:
    """Release a training run's lease, and its ``_staging`` folder when nothing else is in it."""
    from pipelines.storage import drop_if_empty

    held.release()
    drop_if_empty(held.loc.parent)


def _hold_run(storage_path: str, run_id: str) -> Any:
    """The lease of a training run (``<storage>/_staging/train-<run id>.lease``): a second attempt
    of the same run is refused while this one lives."""
    from pipelines.lease import LEASE_SUFFIX, Lease
    from pipelines.storage import STAGING_DIR, Location, new_run_name

    loc = Location.of(storage_path).child(STAGING_DIR, f"train-{run_id}{LEASE_SUFFIX}")
    return Lease.acquire(loc, new_run_name(), where=f"train run {run_id}")


def _trainer(setup: _Setup, job: TrainJob, run_id: str, folder: str) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    train_cfg, prepared = setup.train_cfg, setup.prepared
    loop_config = {
        "status_folder": folder, "model": setup.model_cfg.to_dict(), "train": train_cfg.to_dict(), "run_id": run_id,
        "tracking_uri": setup.uri, "train_rows": prepared.rows["train"], "has_val": bool(setup.val_data),
        "use_difficult": bool(prepared.manifest.get("use_difficult", False)), "in_memory": prepared.in_memory,
        "torch_threads": max(int(job.cpus_per_worker), 1) if job.gpus_per_worker == 0 else None,
        "callbacks": list(job.callbacks), "driver_niceness": driver_niceness(),
    }
    gpus = {"GPU": job.gpus_per_worker} if job.gpus_per_worker else {}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.gpus_per_worker > 0,
                                               resources_per_worker={"CPU": job.cpus_per_worker, **gpus}),
        run_config=ray.train.RunConfig(
            name=f"train-{run_id}", storage_path=setup.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_cfg.keep_checkpoints,
                checkpoint_score_attribute="val_map50" if setup.val_data else None, checkpoint_score_order="max")),
        datasets=prepared.datasets,
    )


def _train(setup: _Setup, job: TrainJob, run_id: str, resumed: bool) -> tuple[Any, str]:
    """Fit (stoppable: :class:`TrainingInterrupted`); returns Ray's result and the run's folder."""
    import mlflow

    ray_name = f"train-{run_id}"
    if not resumed:
        tracking.safe(mlflow.set_tag, "frcnn.ray_run_name", ray_name)
        tracking.log_manifest_input(setup.prepared.manifest, setup.data, "train")
        if setup.val_data:
            from pipelines.schema import read_manifest_at

            tracking.log_manifest_input(read_manifest_at(setup.val_data), setup.val_data, "validation")
    print(f"MLflow run {run_id} (tracking {setup.uri})", flush=True)
    folder = run_folder(setup.storage_path, ray_name).shown
    clear_status(folder)
    trainer = _trainer(setup, job, run_id, folder)
    total_steps = steps_per_epoch(setup.prepared.rows["train"], setup.effective_batch) * setup.train_cfg.epochs
    try:
        with Progress(setup.uri, run_id, total_steps, setup.train_cfg.epochs, job.progress_every):
            return _fit(trainer), folder
    except KeyboardInterrupt:
        ckpt = latest_checkpoint(folder, CHECKPOINT_FILE)
        per_epoch = total_steps // setup.train_cfg.epochs
        done = [s for s in (_last_logged_step(setup.uri, run_id), ckpt and checkpoint_step(ckpt, per_epoch)) if s]
        raise TrainingInterrupted(run_id, max(done, default=None), total_steps, ckpt) from None


def _finish(result: Any, folder: str, setup: _Setup, job: TrainJob, run_id: str) -> TrainResult:
    """Check the outcome, log the final and best checkpoints and metrics, register the model."""
    import mlflow

    from .models import log_checkpoint, register_model

    metrics = dict(result.metrics or {})
    status = read_status(folder)
    if "nan_step" in status:
        tracking.safe(mlflow.set_tag, "frcnn.nan_step", status["nan_step"])
        raise NonFiniteLoss(f"loss became NaN/Inf at step {status['nan_step']}; the last good checkpoint "
                            f"is {result.checkpoint.path if result.checkpoint else 'none (no epoch finished)'}")
    stopped = status.get("early_stop")
    tracking.safe(mlflow.set_tag, "frcnn.stop_reason", "early_stop" if stopped else "completed")
    if stopped:
        print(f"stopped at epoch {stopped['epoch'] + 1}/{setup.train_cfg.epochs}, {stopped['reason']}", flush=True)
    final = best = result.checkpoint
    if setup.val_data and result.best_checkpoints:
        best, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_map50", float("-inf")))
        tracking.safe(mlflow.set_tags, {"frcnn.best_val_map50": f"{best_metrics['val_map50']:.4f}",
                                        "frcnn.best_epoch": int(best_metrics["epoch"]) + 1})
    if final:
        log_checkpoint(final, "checkpoints/final")
    best_path = log_checkpoint(best, "checkpoints/best") if best else None
    version = register_model(best_path, job.model_name) if job.model_name and best_path else None
    return TrainResult(run_id, final.path if final else None, best.path if best else None, metrics, version)


def _print_result(res: TrainResult, model_name: str | None) -> None:
    print(f"checkpoint: {res.checkpoint_path}\nbest checkpoint: {res.best_checkpoint_path}", flush=True)
    shown = {k: v for k, v in res.metrics.items() if not k.startswith("early_stop_")}  # its state, not a metric
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in sorted(shown.items())), flush=True)
    if res.model_version:
        print(f"registered model: models:/{model_name}/{res.model_version}", flush=True)


def resolve_configs(data: str, config_path: str | None, overrides: Overrides) -> tuple[ModelConfig | None, dict]:
    """``--config`` with ``--set`` applied: the model config (None: the shards' own, unchanged) and
    the ``train:`` section. ``model.*`` settings without a model section in ``--config`` change
    the model the shards were made for."""
    from pipelines.schema import read_manifest_at

    model_cfg, train_over = load_config(config_path, overrides) if config_path else (None, overrides.train())
    if model_cfg is None and overrides.section("model"):
        model_cfg = overrides.model(ModelConfig.from_dict(read_manifest_at(data)["model_config"]))
    return model_cfg, train_over


def resume_command(ctx: click.Context, run_id: str) -> str:
    """The command line that continues this run: the options given, with ``--resume RUN_ID``."""
    args = ["frcnn-jobs", ctx.info_name or "train"]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name == "resume":
            continue
        source = ctx.get_parameter_source(p.name)
        if source not in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params[p.name]
        if isinstance(value, Overrides):
            args += [a for item in value.args() for a in ("--set", item)]
        elif p.is_flag:
            args.append(p.opts[0] if value else (p.secondary_opts or [p.opts[0]])[0])
        else:
            args += [p.opts[0], str(int(value) if isinstance(value, float) and value.is_integer() else value)]
    return shlex.join([*args, "--resume", run_id])


@click.command("train")
@click.option("--data", required=True, metavar="PRECOMPUTED", help="Precomputed shards (frcnn-jobs precompute --out).")
@click.option("--val-data", metavar="PRECOMPUTED", default=None,
              help="Validation shards: per-epoch loss and VOC mAP@0.5.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Ray Train workers (DDP ranks).")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True,
              help="GPUs per worker; 0 trains on CPU with gloo.")
@click.option("--cpus-per-worker", type=click.FloatRange(0.1), default=1, show_default=True)
@options.CONFIG
@options.SET
@click.option("--epochs", type=click.IntRange(1), default=None, help="Overrides train.epochs.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Per-worker batch; overrides train.batch_size.")
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
@click.pass_context
def train_cmd(ctx, data, val_data, workers, gpus_per_worker, cpus_per_worker, config_path, overrides, epochs,
              batch_size, lr, experiment, resume, address, storage_path, model_name, progress_every):
    """Train the detector with Ray Train DDP; prints the MLflow run id, checkpoint and metrics.
    Ctrl-C or SIGTERM stops it cleanly and prints the --resume command (exit status 130 / 143)."""
    model_cfg, train_over = resolve_configs(data, config_path, overrides)
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("base_lr", lr)):
        if value is not None:
            train_over[key] = value
    try:
        run_training(data, val_data, model_cfg=model_cfg, train_cfg=TrainConfig.from_dict(train_over),
                     workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                     experiment=experiment, resume=resume, address=address, storage_path=storage_path,
                     model_name=model_name, progress_every=progress_every)
    except TrainingInterrupted as stop:
        step = f"reached step {stop.step}/{stop.total_steps}" if stop.step else "no step done yet"
        click.echo(f"\ninterrupted: the workers are stopped, {step}; MLflow run {stop.run_id} is KILLED", err=True)
        click.echo(f"last checkpoint: {stop.checkpoint or 'none (no checkpoint yet: resuming starts over)'}", err=True)
        click.echo(f"continue with:\n  {resume_command(ctx, stop.run_id)}", err=True)
        ctx.exit(console.exit_status())
    except KeyboardInterrupt:
        click.echo("\ninterrupted before training started; nothing to resume", err=True)
        ctx.exit(console.exit_status())


COMMANDS = [train_cmd]
