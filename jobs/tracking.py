"""MLflow glue: one place that resolves the tracking store and tolerates a server that goes away.

With ``MLFLOW_TRACKING_URI`` unset, MLflow's default store is ``sqlite:///mlflow.db`` resolved
against each process's current directory, and Ray workers run elsewhere: so the URI is made
absolute on the driver and handed to every worker explicitly.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "frcnn"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An absolute tracking URI: the argument, ``MLFLOW_TRACKING_URI``, or ``./mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a bare folder: a file store
        uri = str(Path(uri).resolve())
    return uri


def setup(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # children (Ray workers started later) inherit it
    name = experiment or DEFAULT_EXPERIMENT
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        # Artifacts beside the database (MLflow's default is ./mlruns of whatever the current
        # directory is), so that a store is one folder that `frcnn-jobs ui` serves whole.
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        try:
            mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
        except Exception:  # noqa: BLE001 - created concurrently by another process: use it
            pass
    mlflow.set_experiment(name)
    return uri


def safe(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow logging function; warn instead of raising when the server does not answer.

    A tracking server that stops answering mid-training must not kill the training.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any client/transport error is a warning here
        warnings.warn(f"MLflow: {getattr(fn, '__name__', fn)} failed: {exc}", RuntimeWarning, stacklevel=2)
        return None


def log_params(params: Mapping[str, Any]) -> None:
    """Log params in chunks (MLflow caps a batch at 100) with values stringified."""
    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        safe(mlflow.log_params, dict(items[i:i + 100]))
