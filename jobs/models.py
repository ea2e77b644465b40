"""Checkpoints in MLflow, the model registry, and loading a model from any reference.

A model is stored as a state dict plus its config (``frcnn.training.checkpoint_state``), never as
pickled code: ``torch.load(..., weights_only=True)`` reads it. The registered form is an MLflow
"model from code" pyfunc (``jobs/pyfunc_model.py``) whose only artifact is that checkpoint, so
``mlflow.pyfunc.load_model("models:/frcnn@champion")`` works, and so does our own loader, which
skips MLflow's environment checks and goes straight to the checkpoint.

MODEL references accepted everywhere: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow
run id (its best checkpoint, else its final one), or a checkpoint path (file or folder).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from frcnn import FasterRCNN
from frcnn.training import load_checkpoint, model_from_checkpoint

from . import tracking

CHECKPOINT_FILE = "checkpoint.pt"
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ModelRef:
    """What a MODEL reference resolved to: recorded with every evaluation and inference run."""

    uri: str  # as given
    checkpoint: str  # local checkpoint file
    name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the training run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        return self.run_id or self.checkpoint


def log_checkpoint(checkpoint, artifact_path: str) -> str:
    """Log a Ray Train checkpoint's file under ``artifact_path`` of the active run; return a local
    copy of the file (kept until the process exits)."""
    keep = Path(tempfile.mkdtemp(prefix="frcnn-ckpt-"))
    with checkpoint.as_directory() as d:
        src = Path(d) / CHECKPOINT_FILE
        dst = keep / CHECKPOINT_FILE
        shutil.copyfile(src, dst)
    tracking.safe(mlflow.log_artifact, str(dst), artifact_path)
    return str(dst)


def register_model(checkpoint_file: str, model_name: str) -> str | None:
    """Log the pyfunc (code + checkpoint) in the active run and register it; returns the version."""
    info = tracking.safe(
        mlflow.pyfunc.log_model,
        name="model",
        python_model=PYFUNC_CODE,
        artifacts={"checkpoint": checkpoint_file},
        registered_model_name=model_name,
        # Listed, not inferred: inference would load the model in a subprocess (slow).
        pip_requirements=["frcnn-jobs", "torch==2.14.1", "torchvision==0.29.1", "mlflow==3.17.2"],
    )
    if info is None:
        return None
    return str(info.registered_model_version) if info.registered_model_version is not None else None


def _download(artifact_uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri))


def _find_checkpoint(folder: Path) -> Path:
    hits = sorted(folder.rglob(CHECKPOINT_FILE))
    if not hits:
        raise FileNotFoundError(f"{folder}: no {CHECKPOINT_FILE} inside")
    return hits[0]


def resolve_model(ref: str, client: MlflowClient | None = None) -> ModelRef:
    """Resolve a MODEL reference once (an alias is pinned to its version at this moment)."""
    client = client or MlflowClient()
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.partition("/")
            if not version:
                raise ValueError(f"{ref}: give a version or an alias (models:/NAME/3 or models:/NAME@champion)")
            mv = client.get_model_version(name, version)
        folder = _download(f"models:/{mv.name}/{mv.version}")
        return ModelRef(ref, str(_find_checkpoint(folder)), mv.name, str(mv.version), mv.run_id)
    path = Path(ref)
    if path.exists():
        ckpt = path if path.is_file() else _find_checkpoint(path)
        return ModelRef(ref, str(ckpt))
    if _RUN_ID.match(ref):
        client.get_run(ref)  # raises a clear MLflow error for an unknown run
        for sub in ("checkpoints/best", "checkpoints/final"):
            try:
                folder = _download(f"runs:/{ref}/{sub}")
            except Exception:  # noqa: BLE001 - try the next location
                continue
            return ModelRef(ref, str(_find_checkpoint(folder)), run_id=ref)
        raise FileNotFoundError(f"run {ref} has no checkpoints/best or checkpoints/final artifact")
    raise ValueError(f"{ref}: not a models:/ URI, an MLflow run id, or an existing checkpoint path")


def load_model(ref: str | ModelRef, device: str = "cpu") -> tuple[FasterRCNN, ModelRef]:
    resolved = ref if isinstance(ref, ModelRef) else resolve_model(ref)
    state = load_checkpoint(resolved.checkpoint)
    model = model_from_checkpoint(state).to(device).eval()
    return model, resolved
