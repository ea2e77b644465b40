"""``frcnn-jobs infer``: scheduled batch inference over a folder, prefix or Parquet table of images.

    frcnn-jobs infer --model models:/frcnn@champion --input s3://bucket/incoming \\
        --output s3://bucket/detections --incremental --concurrency 4 --gpus-per-actor 1

``run_infer`` is the importable function behind the command. It resolves MODEL once (an alias is
pinned to its version at the start: that version is in every row and in the MLflow run), runs
``pipelines.infer.run_inference`` inside one MLflow run (``tracking.job_run``: named
``infer-<model>``, tag ``frcnn.job=infer`` plus the model's name, version, URI and training run;
params input, output, incremental...) and logs its counts (``inputs_seen``, ``inputs_new``,
``inputs_failed``, ``inputs_skipped``, ``detections``, ``images_per_s``) and summary
(``infer_summary.json``). A failure ends the run FAILED, Ctrl-C or SIGTERM ends it KILLED (exit
status 130 or 143); either way nothing is published, the staging folder is deleted and the
command exits non-zero. One run at a time writes an output: while another holds it, the command
says which run and since when and exits 75 (``--wait SECONDS`` queues behind it instead), before
any MLflow run is started. The output layout, publishing protocol, lease and incremental ledger
are described in ``pipelines/infer.py``.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import console, options, tracking

log = logging.getLogger(__name__)


@dataclass
class InferRun:
    run_id: str  # the MLflow run
    summary: Any  # pipelines.infer.InferSummary
    model: Any  # jobs.models.ModelRef


@dataclass(frozen=True)
class InferJob:
    """Where ``run_infer`` runs and what it processes (everything but the model, input and output)."""

    options: Any  # pipelines.infer.InferOptions
    address: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    tracking_uri: str | None = None

    def params(self, model_uri: str, input_uri: str, output_uri: str) -> dict[str, Any]:
        o = self.options
        return {"input": input_uri, "output": output_uri, "incremental": o.incremental, "model": model_uri,
                "concurrency": o.concurrency, "gpus_per_actor": o.gpus_per_actor,
                "cpus_per_actor": o.cpus_per_actor, "batch_size": o.batch_size,
                "score_threshold": o.score_threshold}


def run_infer(model_uri: str, input_uri: str, output_uri: str, options: Any = None, *, address: str | None = None,
              experiment: str = tracking.DEFAULT_EXPERIMENT, tracking_uri: str | None = None,
              **option_fields: Any) -> InferRun:
    """Resolve the model, run inference as one MLflow run, return its id and the summary.

    ``options``: a ``pipelines.infer.InferOptions``, or its fields as keywords (``incremental=True,
    concurrency=4``; ``wait`` is how long to queue behind a run that holds the output, else
    ``LeaseHeld`` at once)."""
    import time

    from pipelines.infer import InferOptions, ModelIdentity, output_lease
    from pipelines.lease import wait_free
    from pipelines.runtime import init_ray
    from pipelines.storage import Location

    from .models import resolve_model

    job = InferJob(InferOptions.given(options, option_fields), address, experiment, tracking_uri)
    opts, t0 = job.options, time.monotonic()
    wait_free(output_lease(Location.of(output_uri)), opts.wait, where=Location.of(output_uri).shown,
              on_wait=lambda line: print(line, flush=True) if opts.progress else None)
    tracking.setup(tracking_uri, experiment)
    ref = resolve_model(model_uri)  # once: an alias is pinned for the whole run
    checkpoint = Path(ref.checkpoint).read_bytes()
    identity = ModelIdentity.of_checkpoint(checkpoint, uri=ref.uri, name=ref.name, version=ref.version,
                                           train_run_id=ref.run_id)
    init_ray(address, opts.concurrency * opts.cpus_per_actor, log_to_driver=console.log_to_driver())
    console.quiet_ray()
    left = max(opts.wait - (time.monotonic() - t0), 0.0)
    return _tracked_inference(ref, identity, checkpoint, model_uri, input_uri, output_uri, job, left)


def _tracked_inference(ref: Any, identity: Any, checkpoint: bytes, model_uri: str, input_uri: str,
                       output_uri: str, job: InferJob, wait: float) -> InferRun:
    import dataclasses

    import mlflow

    from pipelines.infer import run_inference
    from pipelines.storage import new_run_name

    partition_run = new_run_name()
    tags = {"frcnn.model_uri": ref.uri, "frcnn.model_name": ref.name, "frcnn.model_version": ref.version,
            "frcnn.train_run_id": ref.run_id, "frcnn.model_sha256": identity.sha256, "frcnn.model_key": identity.key,
            "frcnn.partition_run": partition_run}
    with tracking.job_run("infer", run_name=tracking.infer_run_name(ref.uri), experiment=job.experiment,
                          tracking_uri=job.tracking_uri, tags=tags,
                          params=job.params(model_uri, input_uri, output_uri)) as active:
        run_id = active.info.run_id
        summary = run_inference(input_uri, output_uri, checkpoint, identity,
                                dataclasses.replace(job.options, wait=wait), infer_run_id=run_id,
                                run_name=partition_run)
        tracking.safe(mlflow.log_metrics, {
            "inputs_seen": summary.seen, "inputs_new": summary.new, "inputs_skipped": summary.skipped,
            "inputs_failed": summary.failed, "detections": summary.detections,
            "images_per_s": summary.images_per_s, "seconds": summary.seconds})
        tracking.safe(mlflow.set_tag, "frcnn.partition", summary.partition)
        tracking.safe(mlflow.log_dict, summary.to_dict(), "infer_summary.json")
    return InferRun(run_id, summary, ref)


class OutputBusy(click.ClickException):
    """Another run holds the output: exit status 75 (EX_TEMPFAIL, "try again later")."""

    exit_code = 75


@click.command("infer")
@click.option("--model", "model_uri", required=True, metavar="MODEL",
              help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id, or a checkpoint path. "
                   "Resolved once, at the start.")
@click.option("--input", "input_uri", required=True, metavar="URI",
              help="A folder or object-store prefix of images (jpg, jpeg, png, tif, tiff, webp, bmp; "
                   "recursive), or a Parquet table (file or folder) with an 'image' bytes column and an "
                   "'image_id' or 'path' column.")
@click.option("--output", "output_uri", required=True, metavar="URI",
              help="Output root: each run publishes <URI>/run=<UTC time>-<id>/ (part-*.parquet, _errors/, _SUCCESS).")
@click.option("--incremental", is_flag=True,
              help="Skip inputs already in a published partition made by this model version.")
@options.ACTOR_RESOURCES
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=None,
              help="Drop detections scoring below this (default: only the model's own roi.score_thresh).")
@click.option("--wait", "wait", metavar="SECONDS", type=click.FloatRange(0), default=0, show_default=True,
              help="When another run is writing OUTPUT, wait up to this long for it to end (default: exit 75 "
                   "at once, naming it).")
@options.ADDRESS
@options.EXPERIMENT
@click.pass_context
def infer(ctx, model_uri, input_uri, output_uri, incremental, batch_size, concurrency, gpus_per_actor, cpus_per_actor,
          score_threshold, wait, address, experiment):
    """Detect objects in a folder, prefix or Parquet table of images; publish one partition per run."""
    from pipelines.infer import InferOptions
    from pipelines.lease import LeaseHeld

    opts = InferOptions(incremental=incremental, concurrency=concurrency, gpus_per_actor=gpus_per_actor,
                        cpus_per_actor=cpus_per_actor, batch_size=batch_size, score_threshold=score_threshold,
                        wait=wait)
    try:
        res = run_infer(model_uri, input_uri, output_uri, opts, address=address, experiment=experiment)
    except LeaseHeld as exc:
        hint = "; --wait SECONDS queues behind it" if not wait else f" after waiting {wait:g} s"
        raise OutputBusy(f"{exc}{hint}") from exc
    except KeyboardInterrupt:
        from pipelines.detections import published_runs

        try:
            runs = published_runs(output_uri)
        except OSError:
            runs = []
        last = f"; the latest is {runs[-1]}" if runs else ""
        click.echo(f"\ninterrupted: nothing of this run was published (staging deleted, MLflow run KILLED); "
                   f"{output_uri} holds {len(runs)} published partition(s){last}", err=True)
        rerun = ["frcnn-jobs", "infer", "--model", model_uri, "--input", input_uri, "--output", output_uri,
                 "--incremental"]
        click.echo(f"to process what is left: {shlex.join(rerun)}", err=True)
        ctx.exit(console.exit_status())
    click.echo(f"MLflow run {res.run_id}; model {res.model.label} ({res.model.uri})")


COMMANDS = [infer]
