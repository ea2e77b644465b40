"""``frcnn-jobs infer``: scheduled batch inference over a folder, prefix or Parquet table of images.

    frcnn-jobs infer --model models:/frcnn@champion --input s3://bucket/incoming \\
        --output s3://bucket/detections --incremental --concurrency 4 --gpus-per-actor 1

``run_infer`` is the importable function behind the command. It resolves MODEL once (an alias is
pinned to its version at the start: that version is in every row and in the MLflow run), opens an
MLflow run (tag ``frcnn.job=infer``; tags for the model name, version, URI and training run; params
input, output, incremental...), runs ``pipelines.infer.run_inference`` and logs its counts
(``inputs_seen``, ``inputs_new``, ``inputs_failed``, ``inputs_skipped``, ``detections``,
``images_per_s``) and summary (``infer_summary.json``). Any failure ends the run FAILED and the
command exits non-zero; nothing is published then. The output layout, publishing protocol and
incremental ledger are described in ``pipelines/infer.py``.

Run on a schedule (a Kubernetes ``CronJob`` running this command, or ``ray job submit``), each run
adds one ``run=<UTC timestamp>-<uuid8>`` partition; ``pipelines.infer.read_published(OUTPUT)``
reads them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pipelines.storage import init_ray

from . import options, tracking

log = logging.getLogger(__name__)


@dataclass
class InferRun:
    run_id: str  # the MLflow run
    summary: Any  # pipelines.infer.InferSummary
    model: Any  # jobs.models.ModelRef


def run_infer(model_uri: str, input_uri: str, output_uri: str, *, incremental: bool = False,
              concurrency: int = 1, gpus_per_actor: float = 0, cpus_per_actor: float = 1, batch_size: int = 8,
              score_threshold: float | None = None, address: str | None = None,
              experiment: str = tracking.DEFAULT_EXPERIMENT, tracking_uri: str | None = None,
              progress: bool = True, _fail_after: int | None = None) -> InferRun:
    """Resolve the model, run inference as one MLflow run, return its id and the summary."""
    import mlflow

    from pipelines.infer import ModelIdentity, new_run_name, run_inference

    from .models import resolve_model

    tracking.setup(tracking_uri, experiment)
    ref = resolve_model(model_uri)  # once: an alias is pinned for the whole run
    checkpoint = Path(ref.checkpoint).read_bytes()
    identity = ModelIdentity.of_checkpoint(checkpoint, uri=ref.uri, name=ref.name, version=ref.version,
                                           train_run_id=ref.run_id)
    run_name = new_run_name()
    init_ray(address, concurrency * cpus_per_actor)
    active = mlflow.start_run(run_name=f"infer-{run_name}")
    run_id = active.info.run_id
    try:
        mlflow.set_tags({
            "frcnn.job": "infer", "frcnn.model_uri": ref.uri, "frcnn.model_name": ref.name or "",
            "frcnn.model_version": ref.version or "", "frcnn.train_run_id": ref.run_id or "",
            "frcnn.model_sha256": identity.sha256, "frcnn.model_key": identity.key,
            "frcnn.partition_run": run_name,
        })
        tracking.log_params({"input": input_uri, "output": output_uri, "incremental": incremental,
                             "model": model_uri, "concurrency": concurrency, "gpus_per_actor": gpus_per_actor,
                             "cpus_per_actor": cpus_per_actor, "batch_size": batch_size,
                             "score_threshold": score_threshold})
        summary = run_inference(
            input_uri, output_uri, checkpoint, identity, incremental=incremental, concurrency=concurrency,
            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
            score_threshold=score_threshold, infer_run_id=run_id, run_name=run_name, progress=progress,
            _fail_after=_fail_after)
        tracking.safe(mlflow.log_metrics, {
            "inputs_seen": summary.seen, "inputs_new": summary.new, "inputs_skipped": summary.skipped,
            "inputs_failed": summary.failed, "detections": summary.detections,
            "images_per_s": summary.images_per_s, "seconds": summary.seconds})
        tracking.safe(mlflow.set_tag, "frcnn.partition", summary.partition)
        tracking.safe(mlflow.log_dict, summary.to_dict(), "infer_summary.json")
        mlflow.end_run("FINISHED")
    except BaseException:
        tracking.safe(mlflow.end_run, "FAILED")
        raise
    return InferRun(run_id, summary, ref)


@click.command("infer")
@click.option("--model", "model_uri", required=True, metavar="MODEL",
              help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id, or a checkpoint path. "
                   "Resolved once, at the start.")
@click.option("--input", "input_uri", required=True, metavar="URI",
              help="A folder or object-store prefix of images (jpg, jpeg, png; recursive), or a Parquet table "
                   "(file or folder) with an 'image' bytes column and an 'image_id' or 'path' column.")
@click.option("--output", "output_uri", required=True, metavar="URI",
              help="Output root: each run publishes <URI>/run=<UTC time>-<id>/ (part-*.parquet, _errors/, _SUCCESS).")
@click.option("--incremental", is_flag=True,
              help="Skip inputs already in a published partition made by this model version.")
@click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True, help="Predictor actors.")
@click.option("--gpus-per-actor", type=click.FloatRange(0), default=0, show_default=True,
              help="GPUs per predictor actor; 0 runs on CPU.")
@click.option("--cpus-per-actor", type=click.FloatRange(0.1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Images per model call.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=None,
              help="Drop detections scoring below this (default: only the model's own roi.score_thresh).")
@options.ADDRESS
@options.EXPERIMENT
@click.option("--fail-after", "fail_after", type=int, default=None, hidden=True,
              help="Test only: stop like a killed run after N rows were written to staging.")
def infer(model_uri, input_uri, output_uri, incremental, concurrency, gpus_per_actor, cpus_per_actor, batch_size,
          score_threshold, address, experiment, fail_after):
    """Detect objects in a folder, prefix or Parquet table of images; publish one partition per run."""
    from mlflow.exceptions import MlflowException

    from pipelines.infer import SimulatedKill

    try:
        res = run_infer(model_uri, input_uri, output_uri, incremental=incremental, concurrency=concurrency,
                        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                        score_threshold=score_threshold, address=address, experiment=experiment,
                        _fail_after=fail_after)
    except (FileNotFoundError, FileExistsError, ValueError, SimulatedKill, MlflowException) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"MLflow run {res.run_id}; model {res.model.label} ({res.model.uri})")


COMMANDS = [infer]
