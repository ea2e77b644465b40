"""``frcnn-jobs sweep``: a Ray Tune search over config keys, each trial a Ray Train run, tracked
as MLflow child runs under one parent sweep run.

    frcnn-jobs sweep --data runs/demo/shards/train --val-data runs/demo/shards/val --config demo \\
        --search 'train.base_lr=loguniform(0.005, 0.05)' --search 'model.roi.nms_thresh=choice(0.3, 0.5)' \\
        --trials 8 --max-concurrent 2 --epochs 10

How it fits together (Ray Train V2's pattern for tuning):
- the driver decodes the shards once (``jobs.train_data.prepare_data``), opens the parent MLflow
  run (``frcnn.job=sweep``) and starts a ``ray.tune.Tuner`` over :func:`run_trial`;
- each trial applies its sampled settings to the base config (the same checks as ``--set``),
  opens a child run (``mlflow.parentRunId``) with the resolved config as params, and fits a
  ``TorchTrainer`` running ``jobs.train_loop.train_loop``; rank 0 writes the child run's curves,
  and ``TuneReportCallback`` hands each epoch's report (``val_map50``) to Tune;
- ASHA (``ray.tune.schedulers.ASHAScheduler``) stops trials whose val mAP@0.5 falls behind at its
  rungs; every child run ends with the tag ``frcnn.stopped_early`` (true/false);
- the completed trial with the best val mAP@0.5 has its best checkpoint registered;
- Ctrl-C stops every trial (the driver leaves Ray) and marks the parent and child runs KILLED.

Search spaces: ``KEY=choice(a, b, ...)`` (sampled), ``grid(a, b, ...)`` (every value, in order),
``uniform(lo, hi)``, ``loguniform(lo, hi)``, ``randint(lo, hi)`` (hi excluded); values read as YAML
scalars and checked against the key's type. A YAML file holds the same as a mapping
(``model.roi.nms_thresh: choice(0.3, 0.5)``). Keys that change the precomputed anchor targets
(canvas, anchors, ``rpn.pos_iou``/``neg_iou``/``box_weights``, classes) are refused: the trials
share one set of shards.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from frcnn import ModelConfig
from frcnn.errors import ConfigError
from frcnn.overrides import Overrides, config_value
from frcnn.training import TrainConfig
from frcnn.typed_config import flatten

from . import console, options, tracking

log = logging.getLogger(__name__)

SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
_SEARCH = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\w+)\((.*)\)\s*$")
METRIC = "val_map50"  # what ASHA ranks trials by, reported by every epoch's validation
STOPPED_TAG = "frcnn.stopped_early"
TRIAL_TAG = "frcnn.trial_id"


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` is one of SEARCH_KINDS, ``values`` its arguments (checked)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Dimension:
        m = _SEARCH.match(text)
        if not m:
            raise ConfigError(f"--search {text}: expected KEY=KIND(VALUES), e.g. model.roi.nms_thresh=choice(0.3,0.5)")
        key, kind, inner = m.groups()
        if kind not in SEARCH_KINDS:
            raise ConfigError(f"--search {key}: unknown kind {kind!r}; one of {', '.join(SEARCH_KINDS)}")
        try:
            raw = yaml.safe_load(f"[{inner}]")
        except yaml.YAMLError:
            raise ConfigError(f"--search {key}: {inner!r} is not a list of YAML values") from None
        values = tuple(config_value(key, v) for v in raw)
        if kind in ("choice", "grid") and not values:
            raise ConfigError(f"--search {key}: {kind}() needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"--search {key}: {kind}(low, high) needs two numbers, low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"--search {key}: loguniform needs low > 0")
        _check_shareable(key)
        return cls(key, kind, values)

    def domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)


def _check_shareable(key: str) -> None:
    """Refuse keys the shards' anchor targets depend on: every trial trains on the same shards."""
    base = ModelConfig()
    targets = base.target_fields()
    probe = {"model.canvas", "model.anchors", "model.num_classes", "model.class_names"}
    if key.startswith(tuple(p + "." for p in probe)) or key in probe or \
            key in ("model.rpn.pos_iou", "model.rpn.neg_iou", "model.rpn.box_weights"):
        raise ConfigError(f"--search {key}: changes the precomputed anchor targets ({', '.join(sorted(targets))}); "
                          "a sweep shares one set of shards: precompute and sweep per value instead")


def parse_space(texts: Iterable[str] = (), file: str | None = None) -> tuple[Dimension, ...]:
    """``--search`` options and a ``--search-file`` (YAML mapping ``key: kind(values)``); a key
    given twice is refused."""
    items = list(texts)
    if file:
        data = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"{file}: expected a mapping of key: kind(values), "
                              "e.g. train.base_lr: uniform(0.01, 0.05)")
        items += [f"{k}={v}" for k, v in data.items()]
    dims = tuple(Dimension.parse(t) for t in items)
    keys = [d.key for d in dims]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"--search: {', '.join(dupes)} given more than once")
    if not dims:
        raise ConfigError("nothing to search: give --search KEY=KIND(VALUES) or --search-file")
    return dims


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs (pickled to the trials once, with ``tune.with_parameters``)."""

    model: dict[str, Any]
    train: dict[str, Any]
    sweep_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    storage_path: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    prepared: Any  # jobs.train_data.TrainData
    use_difficult: bool


@dataclass(frozen=True)
class Scheduling:
    """How Tune runs the trials: ASHA over epochs, trials and their concurrency."""

    trials: int = 1  # samples of the space (each grid point this many times)
    max_concurrent: int = 1
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    seed: int = 0


@dataclass
class SweepResult:
    parent_run_id: str
    trials: list[dict[str, Any]]  # run_id, trial_id, settings, best val_map50, stopped_early, status
    best_run_id: str | None
    model_version: str | None


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """One Tune trial: the sampled settings applied, a child MLflow run, a Ray Train fit."""
    import mlflow
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    settings = Overrides(tuple(sorted(config.items())))
    model_cfg = settings.model(ModelConfig.from_dict(plan.model))
    train_cfg = TrainConfig.from_dict(settings.train(plan.train))
    mlflow.set_tracking_uri(plan.tracking_uri)
    run = mlflow.MlflowClient(plan.tracking_uri).create_run(
        plan.experiment_id, run_name=f"{plan.sweep_name}-{trial_id}",
        tags={"mlflow.parentRunId": plan.parent_run_id, "frcnn.job": "sweep-trial", TRIAL_TAG: trial_id,
              "frcnn.sweep_settings": " ".join(settings.args())})
    with mlflow.start_run(run_id=run.info.run_id):
        tracking.log_params({**model_cfg.flat("model"), **flatten(train_cfg.to_dict(), "train"),
                             **{f"sweep.{k}": v for k, v in settings.items}, "job.workers": plan.workers})
        _trainer(plan, trial_id, run.info.run_id, model_cfg, train_cfg).fit()


def _trainer(plan: TrialPlan, trial_id: str, run_id: str, model_cfg: ModelConfig, train_cfg: TrainConfig):
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.runtime import driver_niceness

    from .train_loop import LoopConfig, train_loop
    from .train_state import run_folder

    name = f"{plan.sweep_name}-{trial_id}"
    loop = LoopConfig(model=model_cfg, train=train_cfg, run_id=run_id, tracking_uri=plan.tracking_uri,
                      status_folder=run_folder(plan.storage_path, name).shown, train_rows=plan.prepared.rows["train"],
                      has_val=True, use_difficult=plan.use_difficult, driver_niceness=driver_niceness(),
                      torch_threads=max(int(plan.cpus_per_worker), 1) if plan.gpus_per_worker == 0 else None)
    gpu = {"GPU": plan.gpus_per_worker} if plan.gpus_per_worker else {}
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop.to_dict(), "in_memory": plan.prepared.in_memory},
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=bool(gpu),
                                               resources_per_worker={"CPU": plan.cpus_per_worker, **gpu}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=plan.storage_path, callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints,
                                                         checkpoint_score_attribute=METRIC,
                                                         checkpoint_score_order="max")),
        datasets=plan.prepared.datasets)


def _tuner(plan: TrialPlan, dims: Sequence[Dimension], sched: Scheduling, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The trial function only waits on its Ray Train run, whose workers hold the resources.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0.01})
    return tune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in dims},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=sched.trials,
            search_alg=BasicVariantGenerator(random_state=sched.seed, max_concurrent=sched.max_concurrent),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                                    grace_period=sched.grace_period, reduction_factor=sched.reduction_factor)),
        run_config=tune.RunConfig(name=plan.sweep_name, storage_path=plan.storage_path,
                                  verbose=1 if console.verbose() else 0, callbacks=[_released_trials()]))


def _released_trials():
    """A Tune callback that gives back what a stopped trial's Ray Train run held: when ASHA stops
    a trial, Tune ends its actor and the Train controller with it, but the workers' placement
    group outlives them while this driver runs (``pipelines.runtime.release_orphaned_placement_groups``).
    Checked every couple of seconds of Tune's loop, so the next trial gets the CPUs and GPUs."""
    import time

    from ray import tune

    from pipelines.runtime import release_orphaned_placement_groups

    class ReleaseStoppedTrials(tune.Callback):
        def __init__(self) -> None:
            self._next = 0.0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() >= self._next:
                self._next = time.monotonic() + 2.0
                released = release_orphaned_placement_groups()
                if released:
                    log.debug("released %d placement group(s) of stopped trials", released)

    return ReleaseStoppedTrials()


def run_sweep(data: str, val_data: str, dims: Sequence[Dimension], *, model_cfg: ModelConfig | None = None,
              train_cfg: TrainConfig | None = None, sched: Scheduling = Scheduling(), workers: int = 1,
              cpus_per_worker: float = 1, gpus_per_worker: float = 0, experiment: str = tracking.DEFAULT_EXPERIMENT,
              address: str | None = None, storage_path: str | None = None, model_name: str | None = "frcnn",
              tracking_uri: str | None = None) -> SweepResult:
    """Search ``dims`` with ASHA; returns the parent run, each trial's outcome and the version
    registered from the best completed trial. Ctrl-C raises KeyboardInterrupt after marking the
    parent and every unfinished child run KILLED."""
    import mlflow

    from pipelines.runtime import init_ray
    from pipelines.schema import read_manifest_at

    from .train import _fit
    from .train_data import prepare_data

    train_cfg = TrainConfig.from_dict({**(train_cfg or TrainConfig()).to_dict(), "val_every": 1})
    uri = tracking.setup(tracking_uri, experiment)
    manifest = read_manifest_at(data)
    model_cfg = model_cfg or ModelConfig.from_dict(manifest["model_config"])
    init_ray(address, sched.max_concurrent * workers * cpus_per_worker, log_to_driver=console.log_to_driver())
    console.quiet_ray()
    prepared = prepare_data(data, val_data, model_cfg, train_cfg)
    storage_path = storage_path or str(Path("ray_results").resolve())
    name = tracking.run_name("sweep", model_cfg.backbone.name, f"{len(dims)}keys")
    params = {**model_cfg.flat("model"), **flatten(train_cfg.to_dict(), "train"),
              **{f"search.{d.key}": f"{d.kind}{list(d.values)}" for d in dims}, "sweep.trials": sched.trials,
              "sweep.max_concurrent": sched.max_concurrent, "sweep.grace_period": sched.grace_period,
              "sweep.reduction_factor": sched.reduction_factor, "job.workers": workers, "job.data": data,
              "job.val_data": val_data}
    with tracking.job_run("sweep", run_name=name, experiment=experiment, params=params, tracking_uri=uri) as parent:
        parent_id = parent.info.run_id
        print(f"MLflow sweep run {parent_id} (tracking {uri})", flush=True)
        plan = TrialPlan(model_cfg.to_dict(), train_cfg.to_dict(), f"{name}-{parent_id[:8]}", parent_id,
                         parent.info.experiment_id, uri, storage_path, workers, cpus_per_worker, gpus_per_worker,
                         prepared, bool(manifest.get("use_difficult", False)))
        try:
            grid = _fit(_tuner(plan, dims, sched, train_cfg.epochs))
        except KeyboardInterrupt:
            _end_children(uri, parent_id, "KILLED")
            raise
        trials = _finish_trials(uri, parent_id, grid, train_cfg.epochs)
        best = max((t for t in trials if t["status"] == "FINISHED" and not t["stopped_early"]),
                   key=lambda t: t["best_val_map50"], default=None)
        version = _register_best(uri, best, model_name) if best and model_name else None
        if best:
            mlflow.set_tags({"frcnn.best_run_id": best["run_id"],
                             "frcnn.best_val_map50": f"{best['best_val_map50']:.4f}"})
            mlflow.log_metric("val/best_map50", best["best_val_map50"])
    _print_summary(trials, best, model_name, version)
    return SweepResult(parent_id, trials, best["run_id"] if best else None, version)


def _children(client, parent_id: str) -> list:
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000)


def _end_children(uri: str, parent_id: str, status: str) -> None:
    """Every child run still RUNNING ends with ``status`` (a Ctrl-C: KILLED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for run in tracking.safe(_children, client, parent_id) or []:
        if run.info.status == "RUNNING":
            tracking.safe(client.set_terminated, run.info.run_id, status)


def _finish_trials(uri: str, parent_id: str, grid, epochs: int) -> list[dict[str, Any]]:
    """Each trial's child run ends with its tag: a trial that ended before its last epoch without
    an error was stopped by ASHA (its run is still open: Tune stops a trial mid-fit)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = {r.data.tags.get(TRIAL_TAG): r for r in _children(client, parent_id)}
    out = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.split("_")[1]
        run = runs.get(trial_id)
        if run is None:
            continue
        history = result.metrics_dataframe
        maps = [float(v) for v in history[METRIC].dropna()] if history is not None and METRIC in history else []
        ckpt = None
        if history is not None and "checkpoint_path" in history and METRIC in history:
            rows = history.dropna(subset=["checkpoint_path", METRIC])
            ckpt = str(rows.loc[rows[METRIC].idxmax(), "checkpoint_path"]) if len(rows) else None
        last_epoch = int((result.metrics or {}).get("epoch", -1))
        stopped = result.error is None and last_epoch < epochs - 1
        status = "FAILED" if result.error is not None else "FINISHED"
        # Set here for every trial: ASHA also ends a trial at its last epoch (max_t), before the
        # trial function itself gets to its end.
        client.set_tag(run.info.run_id, STOPPED_TAG, "true" if stopped else "false")
        # A trial Tune stopped mid-fit ended its run FAILED (interrupted) or left it RUNNING.
        if stopped or run.info.status == "RUNNING" or result.error is not None:
            client.set_terminated(run.info.run_id, status)
        out.append({"run_id": run.info.run_id, "trial_id": trial_id, "stopped_early": stopped, "status": status,
                    "epochs": last_epoch + 1, "best_val_map50": max(maps, default=float("nan")),
                    "settings": run.data.tags.get("frcnn.sweep_settings", ""), "checkpoint": ckpt})
    return out


def _register_best(uri: str, best: dict[str, Any], model_name: str) -> str | None:
    """Log the best trial's best checkpoint (the one Tune saw with its highest val mAP@0.5) to
    its child run and register it from there."""
    import mlflow
    import ray.train

    from .models import log_checkpoint, register_model

    if not best.get("checkpoint"):
        return None
    with mlflow.start_run(run_id=best["run_id"], nested=True):
        local = log_checkpoint(ray.train.Checkpoint(best["checkpoint"]), "checkpoints/best")
        return register_model(local, model_name)


def _print_summary(trials: list[dict[str, Any]], best: dict[str, Any] | None, model_name: str | None,
                   version: str | None) -> None:
    for t in sorted(trials, key=lambda t: -t["best_val_map50"] if t["best_val_map50"] == t["best_val_map50"] else 1):
        how = "stopped early by ASHA" if t["stopped_early"] else t["status"].lower()
        print(f"trial {t['trial_id']}: {t['settings'] or '(base config)'}: best val_map50 {t['best_val_map50']:.4f} "
              f"after {t['epochs']} epoch(s), {how} (run {t['run_id']})", flush=True)
    if best:
        print(f"best trial: {best['trial_id']} (run {best['run_id']})", flush=True)
    if version:
        print(f"registered model: models:/{model_name}/{version}", flush=True)


@click.command("sweep")
@click.option("--data", required=True, metavar="PRECOMPUTED", help="Precomputed training shards.")
@click.option("--val-data", required=True, metavar="PRECOMPUTED",
              help="Validation shards: every epoch's val mAP@0.5 is what ASHA ranks trials by.")
@options.CONFIG
@options.SET
@click.option("--search", "searches", multiple=True, metavar="KEY=KIND(VALUES)",
              help="A searched key, repeatable: choice(a,b,...), grid(a,b,...), uniform(lo,hi), loguniform(lo,hi), "
                   "randint(lo,hi), e.g. --search 'model.roi.nms_thresh=choice(0.3,0.5)'.")
@click.option("--search-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML mapping of searched keys: 'train.base_lr: loguniform(0.005, 0.05)'.")
@click.option("--trials", type=click.IntRange(1), default=4, show_default=True,
              help="Samples of the space (Tune's num_samples; each grid() point this many times).")
@click.option("--max-concurrent", type=click.IntRange(1), default=1, show_default=True, help="Trials at once.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Overrides train.epochs (ASHA's max_t).")
@click.option("--grace-period", type=click.IntRange(1), default=1, show_default=True,
              help="Epochs each trial runs before ASHA may stop it.")
@click.option("--reduction-factor", type=click.IntRange(2), default=2, show_default=True,
              help="ASHA keeps the top 1/N of the trials at each rung.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random state of the sampling.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Ray Train workers per trial.")
@click.option("--cpus-per-worker", type=click.FloatRange(0.1), default=1, show_default=True)
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True)
@options.EXPERIMENT
@options.ADDRESS
@click.option("--storage-path", metavar="URI", default=None, help="Tune and Train results. Default: ./ray_results.")
@click.option("--model-name", metavar="NAME", default="frcnn", show_default=True,
              help="Registered model name for the best trial.")
@click.pass_context
def sweep_cmd(ctx, data, val_data, config_path, overrides, searches, search_file, trials, max_concurrent, epochs,
              grace_period, reduction_factor, seed, workers, cpus_per_worker, gpus_per_worker, experiment, address,
              storage_path, model_name):
    """Search config keys with Ray Tune and ASHA; each trial is a Ray Train run and an MLflow child
    run; the best trial's model is registered. Ctrl-C or SIGTERM stops every trial (exit status 130 / 143)."""
    from .train import resolve_configs

    dims = parse_space(searches, search_file)
    model_cfg, train_over = resolve_configs(data, config_path, overrides)
    if epochs is not None:
        train_over["epochs"] = epochs
    train_cfg = TrainConfig.from_dict(train_over)
    try:
        run_sweep(data, val_data, dims, model_cfg=model_cfg, train_cfg=train_cfg,
                  sched=Scheduling(trials, max_concurrent, grace_period, reduction_factor, seed), workers=workers,
                  cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, experiment=experiment,
                  address=address, storage_path=storage_path, model_name=model_name)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every trial is stopped; the sweep run and its unfinished trial runs are KILLED",
                   err=True)
        ctx.exit(console.exit_status())


COMMANDS = [sweep_cmd]
