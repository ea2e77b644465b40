"""``frcnn-jobs demo``: the whole workflow on the embedded default, on a laptop.

    frcnn-jobs demo --workdir runs/demo        # what `make demo` runs

generate (VOC layout) -> precompute train and val (Ray Data) -> train (Ray Train, MLflow) ->
evaluate on the test split (VOC and COCO mAP, an MLflow evaluation run) -> promote to
``champion`` -> infer the test images twice (the second run, incremental, has nothing new).
Everything is local: a local Ray instance, MLflow in ``<workdir>/mlflow.db``, CPU.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow

from frcnn.config import load_config
from frcnn.training import TrainConfig
from pipelines.runtime import init_ray

from . import console, tracking

DEMO_CONFIG = "demo"  # frcnn/configs/demo.yaml, shipped in the package


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs on: its folder, tracking store and the jobs' settings."""

    work: Path
    uri: str
    images: int
    seed: int
    config_path: str
    workers: int
    cpus_per_worker: float
    epochs: int | None
    experiment: str


def run_demo(workdir: str, *, images: int = 700, seed: int = 0, config_path: str | None = None,
             workers: int = 1, cpus_per_worker: float = 2, epochs: int | None = None,
             experiment: str = "frcnn-demo", fresh: bool = True) -> dict:
    t_start = time.perf_counter()
    work = Path(workdir).resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup(f"sqlite:///{work / 'mlflow.db'}", experiment)
    plan = DemoPlan(work, uri, images, seed, str(config_path or DEMO_CONFIG), workers, cpus_per_worker, epochs,
                    experiment)
    timings: dict[str, float] = {}

    def step(name: str):
        timings[name] = time.perf_counter()
        click.secho(f"\n== {name} ({time.perf_counter() - t_start:.0f} s)", fg="cyan", bold=True)

    try:
        return _steps(step, plan, t_start)
    except KeyboardInterrupt as stop:
        raise DemoInterrupted(next(reversed(timings), "start"), uri, stop) from None


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during the demo: the job that was running ended its MLflow run KILLED."""

    def __init__(self, step: str, uri: str, cause: KeyboardInterrupt) -> None:
        super().__init__(f"demo interrupted during {step}")
        self.step, self.uri, self.cause = step, uri, cause


def _steps(step, plan: DemoPlan, t_start: float) -> dict:
    step("generate")
    data = _generate(plan)
    init_ray(None, plan.workers * plan.cpus_per_worker, log_to_driver=console.log_to_driver())
    console.quiet_ray()
    step("precompute")
    shards = _precompute(plan, data)
    step("train")
    trained = _train(plan, shards)
    step("evaluate")
    model_ref = f"models:/frcnn-demo/{trained.model_version}" if trained.model_version else trained.run_id
    evaluation = _evaluate(plan, data, model_ref)
    step("promote")
    champion = _promote(trained, model_ref)
    step("infer")
    runs = _infer(plan, data, champion)
    return _report(plan, trained, evaluation, runs, time.perf_counter() - t_start)


def _generate(plan: DemoPlan) -> Path:
    from pipelines.synth import generate

    data = plan.work / "synth"  # the dataset's folder name is what run names call it (precompute-synth-train)
    summary = generate(str(data), n_images=plan.images, seed=plan.seed, min_size=240, max_size=320)
    print(f"{summary['images']} images in VOC layout at {data}: splits {summary['splits']}")
    return data


def _precompute(plan: DemoPlan, data: Path) -> dict[str, str]:
    from .data_cmds import run_precompute

    shards = {}
    for split in ("train", "val"):
        shards[split] = str(plan.work / "shards" / split)
        run_precompute(str(data), split, shards[split], config_path=plan.config_path, experiment=plan.experiment,
                       progress=False)
    return shards


def _train(plan: DemoPlan, shards: dict[str, str]):
    from .train import run_training

    model_cfg, train_over = load_config(plan.config_path)
    if plan.epochs:
        train_over["epochs"] = plan.epochs
    return run_training(shards["train"], shards["val"], model_cfg=model_cfg,
                        train_cfg=TrainConfig.from_dict(train_over), workers=plan.workers,
                        cpus_per_worker=plan.cpus_per_worker, experiment=plan.experiment,
                        storage_path=str(plan.work / "ray_results"), model_name="frcnn-demo")


def _evaluate(plan: DemoPlan, data: Path, model_ref: str):
    from .evaluate import run_evaluation

    return run_evaluation(model=model_ref, data_root=str(data), split="test", experiment=plan.experiment,
                          batch_size=16, cpus_per_actor=max(1, int(plan.cpus_per_worker)))


def _promote(trained, model_ref: str) -> str:
    """Promote the trained version to ``champion`` if it beats the holder; the model to infer with."""
    from .models import promote

    if not trained.model_version:
        return model_ref
    promoted = promote(model_ref, "champion", if_better_than="champion", metric="map50", split="test")
    return "models:/frcnn-demo@champion" if promoted.promoted else model_ref


def _infer(plan: DemoPlan, data: Path, model: str) -> tuple:
    """The test images dropped into a folder, inferred twice (the second run finds nothing new)."""
    from .infer import run_infer

    incoming = plan.work / "incoming"
    incoming.mkdir()
    test_ids = (data / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    for image_id in test_ids:
        shutil.copy(data / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", incoming)
    # Every job of the demo in the demo's experiment (and store), inference included.
    out = str(plan.work / "detections")
    return tuple(run_infer(model, str(incoming), out, incremental=True, experiment=plan.experiment) for _ in range(2))


def _report(plan: DemoPlan, trained, evaluation, runs: tuple, total: float) -> dict:
    first, again = runs
    m = evaluation.metrics
    click.secho("\n== results", fg="green", bold=True)
    print(f"test split ({int(m.get('images', 0))} images): VOC mAP@0.5 = {m['map50']:.3f} "
          f"(11-point {m['map50_voc07']:.3f}), COCO mAP@[.5:.95] = {m['coco_map']:.3f}, AP50 = {m['coco_ap50']:.3f}")
    print(f"MLflow tracking store: {plan.uri}")
    print(f"  training run:    {trained.run_id}  (model frcnn-demo version {trained.model_version})")
    print(f"  evaluation run:  {evaluation.run_id}")
    print(f"  inference runs:  {first.run_id} (new {first.summary.new}), "
          f"{again.run_id} (new {again.summary.new}, incremental)")
    exp_id = mlflow.get_experiment_by_name(plan.experiment).experiment_id
    print(f"open the UI: MLFLOW_TRACKING_URI={plan.uri} frcnn-jobs ui, then "
          f"{tracking.experiment_url('http://127.0.0.1:5000', exp_id)}")
    print(f"total {total:.0f} s")
    return {"map50": m["map50"], "train_run_id": trained.run_id, "eval_run_id": evaluation.run_id,
            "seconds": total, "model_version": trained.model_version}


@click.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Everything the demo writes (data, shards, MLflow store, checkpoints); replaced on each run.")
@click.option("--images", type=click.IntRange(20), default=700, show_default=True, help="Generated images.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Overrides the demo config's train.epochs.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--cpus-per-worker", type=click.FloatRange(0.5), default=2, show_default=True)
@click.pass_context
def demo_cmd(ctx, workdir, images, epochs, workers, cpus_per_worker):
    """Generate data, precompute, train, evaluate, promote and infer, locally, on CPU.
    Ctrl-C stops the running job (its MLflow run ends KILLED) and exits 130."""
    try:
        run_demo(workdir, images=images, epochs=epochs, workers=workers, cpus_per_worker=cpus_per_worker)
    except DemoInterrupted as stop:
        click.echo(f"\ninterrupted during {stop.step}: that job's MLflow run is KILLED, the earlier ones are in "
                   f"{stop.uri}", err=True)
        if getattr(stop.cause, "run_id", None):  # the training's own account: step reached, checkpoint
            click.echo(f"training run {stop.cause.run_id}: {stop.cause}; last checkpoint "
                       f"{getattr(stop.cause, 'checkpoint', None) or 'none'}", err=True)
        click.echo(f"the demo starts over with: frcnn-jobs demo --workdir {workdir}  (it replaces the folder)",
                   err=True)
        ctx.exit(console.exit_status())


COMMANDS = [demo_cmd]
