"""MLflow glue: the tracking store, one job-run context manager, run names, and a metric writer
that survives a tracking server outage.

    with tracking.job_run("evaluate", run_name=tracking.evaluate_run_name(model, split),
                          experiment=experiment, tags={...}, params={...}) as run:
        ...                                   # run.info.run_id; mlflow.log_metrics(...) as usual
    # FINISHED on success, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (the exception goes on)

With ``MLFLOW_TRACKING_URI`` unset, MLflow's default store is ``sqlite:///mlflow.db`` resolved
against each process's current directory, and Ray workers run elsewhere: so the URI is made
absolute on the driver and handed to every worker explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from pipelines.lease import set_owner

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "frcnn"
# The experiment kind MLflow's UI reads when it has no "GenAI | Model training" switch (3.17.2's
# UI has one, see `experiment_url`): set on every experiment the jobs use.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
JOB_TAG = "frcnn.job"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An absolute tracking URI: the argument, ``MLFLOW_TRACKING_URI``, or ``./mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a bare folder: a file store
        uri = str(Path(uri).resolve())
    return uri


def setup(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point this process (and the Ray workers it starts later) at the store, create or select the
    experiment with the model-training kind, and return the absolute tracking URI."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # children (Ray workers started later) inherit it
    name = experiment or DEFAULT_EXPERIMENT
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            # Artifacts beside the database (MLflow's default is ./mlruns of whatever the current
            # directory is), so that a store is one folder that `frcnn-jobs ui` serves whole.
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        try:
            client.create_experiment(name, artifact_location=artifact_location,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            if client.get_experiment_by_name(name) is None:  # not a concurrent create: a real error
                raise
    elif exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # Experiments made before the tag existed, or by plain `mlflow`: open them on runs too.
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)
    return uri


def experiment_url(ui_base: str, experiment_id: str) -> str:
    """The UI page of an experiment, opened on its training runs.

    MLflow 3.17's UI chooses between its GenAI view (traces, token usage) and its model-training
    view (the runs table) with the "GenAI | Model training" switch at the top left; its default is
    GenAI, a click is remembered by that browser, and ``workflowType=machine_learning`` in the URL
    selects training (seen in a browser: the experiment's ``mlflow.experimentKind`` tag alone does
    not, in this UI). Print this link wherever a job points the user at the UI.
    """
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


# ---- run names ------------------------------------------------------------------------------

def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", str(text)).strip("-")


def model_label(model: str) -> str:
    """A short name for a model reference, for run names: ``models:/frcnn/3`` -> ``frcnn-v3``,
    ``models:/frcnn@champion`` -> ``frcnn@champion``, a run id -> its first 8 characters, a
    checkpoint path -> its folder name."""
    ref = str(model)
    if ref.startswith("models:/"):
        name, _, version = ref[len("models:/"):].partition("/")
        return _slug(f"{name}-v{version}" if version else name)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return ref[:8]
    if "/" in ref or os.sep in ref:
        path = Path(ref.rstrip("/"))
        return _slug(path.parent.name if path.suffix else path.name)
    return _slug(ref)


def run_name(job: str, *parts: Any) -> str:
    """``job-part-part...``: what ran, readable in the MLflow UI (empty parts are left out)."""
    return "-".join([_slug(job), *(_slug(p) for p in parts if p not in (None, ""))])


def train_run_name(backbone: str, dataset: str, workers: int) -> str:
    """``train-<backbone>-<dataset>-<N>w``, e.g. ``train-tiny-synth-1w``."""
    return run_name("train", backbone, dataset, f"{int(workers)}w")


def evaluate_run_name(model: str, split: str) -> str:
    """``evaluate-<model>-<split>``, e.g. ``evaluate-frcnn-demo-v1-test``."""
    return run_name("evaluate", model_label(model), split)


def infer_run_name(model: str) -> str:
    """``infer-<model>``, e.g. ``infer-frcnn-demo@champion``."""
    return run_name("infer", model_label(model))


def precompute_run_name(dataset: str, split: str) -> str:
    """``precompute-<dataset>-<split>``, e.g. ``precompute-synth-train``."""
    return run_name("precompute", dataset, split)


# ---- one job run ----------------------------------------------------------------------------

@contextlib.contextmanager
def job_run(job: str, *, run_name: str | None = None, experiment: str | None = None,
            tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
            run_id: str | None = None, tracking_uri: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one job, ended with the status of what happened inside.

    Sets up the store (``setup``), starts a run named ``run_name`` in ``experiment`` (or, with
    ``run_id``, resumes that run: its params are left as they are, ``tags`` are set again), tags it
    ``frcnn.job=<job>`` plus ``tags``, logs ``params``, and yields the ``mlflow.ActiveRun``. The
    run ends FINISHED when the block completes, FAILED when it raises, KILLED on Ctrl-C or SIGTERM
    (``KeyboardInterrupt``, see ``jobs.console``); the exception always propagates. Ending a failed run never masks the
    original error (a tracking server that is down only adds a warning).
    """
    uri = setup(tracking_uri, experiment)
    if run_id:
        active = mlflow.start_run(run_id=run_id)
    else:
        active = mlflow.start_run(run_name=run_name)
    try:
        mlflow.set_tags({JOB_TAG: job, **{k: "" if v is None else str(v) for k, v in (tags or {}).items()}})
        if params and not run_id:
            log_params(params)
        log.debug("MLflow run %s (%s) in %s", active.info.run_id, run_name or job, uri)
        set_owner(job, active.info.run_id)  # named in the leases this run takes
        yield active
    except BaseException as exc:
        safe(mlflow.end_run, end_status(exc))
        raise
    finally:
        set_owner(None)
    mlflow.end_run("FINISHED")


def end_status(exc: BaseException) -> str:
    """KILLED for a stop request (Ctrl-C, SIGTERM: also when Ray turned it into another error on
    the way out), FAILED for anything else."""
    from .console import stop_requested

    return "KILLED" if isinstance(exc, KeyboardInterrupt) or stop_requested() else "FAILED"


def log_params(params: Mapping[str, Any]) -> None:
    """Log params, ``None`` as an empty string. MLflow's client batches them (100 a request) and
    truncates values past its length limit itself."""
    safe(mlflow.log_params, {k: "" if v is None else v for k, v in params.items()})


def safe(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow function that must not end the job (a tag, an artifact, a final status):
    warn instead of raising. Metrics that must all arrive go through ``MetricBuffer`` instead."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any client/transport error is a warning here
        warnings.warn(f"MLflow: {getattr(fn, '__name__', fn)} failed: {exc}", RuntimeWarning, stacklevel=2)
        return None


# ---- metrics through an outage --------------------------------------------------------------

class MetricBuffer:
    """Metrics for one run that reach the store even across a tracking server outage.

    For the training loop's rank 0 (and any job that logs many steps)::

        metrics = tracking.MetricBuffer(run_id, tracking_uri)
        ...
        metrics.log({"loss_total": 0.7, "lr": 0.01}, step=120)   # never blocks, never raises
        ...
        metrics.close()   # at the end of the loop: writes what is pending (waits up to `timeout`)

    ``log`` only appends to a bounded in-memory queue; a background thread writes the queue with
    ``MlflowClient.log_batch`` (up to 1000 metrics a request, in step order), so a slow or absent
    server never stalls the caller. When a write fails the metrics stay queued and the thread
    retries every ``retry_every`` seconds; one warning says the server is unreachable and one says
    how many buffered metrics were written once it answers again (not one per call). Past
    ``max_pending`` metrics the oldest are dropped, and the count dropped is reported on recovery
    and by ``close``. Non-finite values are skipped (MLflow refuses NaN in some stores).
    Use it from one process per run (rank 0); ``log`` is thread-safe.

    Training: call ``flush()`` (it returns False while the store is down) before reporting a
    checkpoint, so that a group restarted from that checkpoint finds every earlier step in the
    run; what was queued after it is logged again by the restarted group.
    """

    BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, max_pending: int = 200_000,
                 retry_every: float = 5.0, flush_every: float = 1.0) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(resolve_tracking_uri(tracking_uri))
        self.retry_every = retry_every
        self.flush_every = flush_every
        self.dropped = 0
        self.written = 0
        self._pending: deque = deque()
        self._max = max_pending
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one writer at a time: a metric is sent once
        self._wake = threading.Event()
        self._stop = False
        self._outage_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def log(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue ``metrics`` at ``step``; returns at once."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        batch = []
        for key, value in metrics.items():
            v = float(value)
            if v == v and v not in (float("inf"), float("-inf")):
                batch.append(Metric(key, v, ts, int(step)))
        with self._lock:
            for m in batch:
                if len(self._pending) >= self._max:
                    self._pending.popleft()
                    self.dropped += 1
                self._pending.append(m)

    def flush(self) -> bool:
        """Write what is queued now, in the caller's thread; True when nothing is left."""
        with self._flushing:
            return self._flush()

    def _flush(self) -> bool:
        while True:
            with self._lock:
                chunk = [self._pending[i] for i in range(min(self.BATCH, len(self._pending)))]
            if not chunk:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - any transport/server error: keep them, retry later
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    warnings.warn(f"MLflow: cannot write metrics of run {self.run_id} ({exc}); buffering them "
                                  f"and retrying every {self.retry_every:g} s", RuntimeWarning, stacklevel=2)
                return False
            with self._lock:
                for _ in chunk:
                    self._pending.popleft()
            self.written += len(chunk)
            if self._outage_since is not None:
                lost = f", {self.dropped} dropped (buffer full)" if self.dropped else ""
                warnings.warn(f"MLflow: tracking server answers again after "
                              f"{time.monotonic() - self._outage_since:.0f} s; writing the buffered metrics"
                              f"{lost}", RuntimeWarning, stacklevel=2)
                self._outage_since = None

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.retry_every if self._outage_since is not None else self.flush_every)
            self._wake.clear()
            if self._stop:
                break
            self.flush()

    def close(self, timeout: float = 120.0) -> bool:
        """Stop the background writer and write what is pending, retrying for up to ``timeout``
        seconds; True when everything was written. A warning says how many were not."""
        self._stop = True
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + timeout
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(self.retry_every, max(0.0, deadline - time.monotonic())))
        left = self.pending
        if left or self.dropped:
            warnings.warn(f"MLflow: {left} metrics of run {self.run_id} not written, {self.dropped} dropped",
                          RuntimeWarning, stacklevel=2)
        return left == 0 and self.dropped == 0

    def __enter__(self) -> MetricBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the dataset a run used --------------------------------------------------------------------

def log_dataset(name: str, source: str, digest: str, context: str) -> None:
    """Log the run's dataset as an MLflow dataset input (``mlflow.log_input``): ``name``, the
    ``source`` URI or path it was read from, ``digest`` (a precompute manifest's content hash) and
    ``context`` (``train``, ``validation``, ``evaluation``...). The UI's Dataset column shows it
    and runs can be searched by it. A tracking failure is a warning, as for other artifacts."""
    import warnings as _warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    def log() -> None:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": a local path is local
            src = resolve_dataset_source(source)
        mlflow.log_input(MetaDataset(source=src, name=name, digest=digest), context=context)

    safe(log)


def log_manifest_input(manifest: Mapping[str, Any], path: str, context: str) -> None:
    """Log a precompute output as the run's MLflow dataset: named ``<format>-<split>``, sourced at
    its path, digested by its manifest's content hash."""
    name = f"{manifest.get('dataset', 'voc')}-{manifest.get('split', 'data')}"
    log_dataset(name, path, str(manifest.get("content_hash") or ""), context)
