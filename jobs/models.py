"""Model references, the registry and promotion.

A model is stored as a state dict plus its config (``frcnn.training.checkpoint_state``), never as
pickled code: ``torch.load(..., weights_only=True)`` reads it. The registered form is an MLflow
"model from code" pyfunc (``jobs/pyfunc_model.py``) whose only artifact is that checkpoint, so
``mlflow.pyfunc.load_model("models:/frcnn@champion")`` works, and so does our own loader, which
skips MLflow's environment checks and goes straight to the checkpoint. The registered model carries
its own code: a copy of ``frcnn/`` (pure PyTorch) as its ``code_paths``, and requirements pinned to
the installed versions of what a package index serves (``model_requirements``), so a serving host
without this project loads it (``mlflow models serve``, any environment manager).

MODEL references accepted everywhere: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow
run id (its best checkpoint, else its final one), or a checkpoint path (file or folder). One
parser (``parse_registry_ref``) reads the ``models:/`` forms for every command.

Promotion: ``promote`` sets a registry alias. With ``if_better_than`` it compares the latest
FINISHED evaluation runs of the candidate and of the version holding that alias, on the same
dataset, split, data root and years, and moves the alias only when the candidate is strictly
better (every metric here is higher-is-better) or when nobody holds the alias yet.

    frcnn-jobs promote models:/frcnn/3 --alias champion --if-better-than champion --metric map50
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from frcnn.errors import JobError
from pipelines.datasets import FORMATS

from . import tracking

CHECKPOINT_FILE = "checkpoint.pt"
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_model.py"))
# What the registered model imports (frcnn's own imports, the pyfunc's), as package-index names.
MODEL_DISTRIBUTIONS = ("torch", "torchvision", "pillow", "numpy", "pyyaml", "pandas", "mlflow")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_REGISTRY = re.compile(r"^(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")


class ModelRefError(JobError, ValueError):
    """A MODEL reference that names no model: not a registry URI, run id or checkpoint path."""


class PromotionError(click.ClickException):
    """A promotion that cannot be decided (missing evaluation, unknown version...)."""


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


def parse_registry_ref(ref: str, bare: bool = False) -> tuple[str, str | None, str | None] | None:
    """``models:/NAME/VERSION`` -> (NAME, VERSION, None); ``models:/NAME@ALIAS`` -> (NAME, None,
    ALIAS). With ``bare``, ``NAME/VERSION`` and ``NAME@ALIAS`` too. None when ``ref`` is not in a
    registry form at all; ``ModelRefError`` for a ``models:/`` URI that does not parse."""
    body = ref[len("models:/"):] if ref.startswith("models:/") else (ref if bare else None)
    if body is None:
        return None
    m = _REGISTRY.match(body)
    if not m:
        if ref.startswith("models:/"):
            raise ModelRefError(f"{ref}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return None
    return m.group("name"), m.group("version"), m.group("alias")


def registry_version(ref: str, client: MlflowClient | None = None, bare: bool = False):
    """The registry's ModelVersion for a ``models:/`` reference (an alias resolved now); None when
    ``ref`` is not a registry reference."""
    parsed = parse_registry_ref(ref, bare)
    if parsed is None:
        return None
    client = client or MlflowClient()
    name, version, alias = parsed
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)


def log_checkpoint(checkpoint, artifact_path: str) -> str:
    """Log a Ray Train checkpoint's file under ``artifact_path`` of the active run; return a local
    copy of the file (kept until the process exits)."""
    keep = Path(tempfile.mkdtemp(prefix="frcnn-ckpt-"))
    with checkpoint.as_directory() as d:
        dst = keep / CHECKPOINT_FILE
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, dst)
    tracking.safe(mlflow.log_artifact, str(dst), artifact_path)
    return str(dst)


def pyfunc_signature():
    """What the registered model takes and returns (shown in the MLflow UI; inputs are checked):
    a DataFrame with an ``image`` column of encoded bytes -> one row per image."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec(Array(Array("double")), "boxes"), ColSpec(Array("double"), "scores"),
                        ColSpec(Array("long"), "labels"), ColSpec(Array("string"), "class_names"),
                        ColSpec(Array("long"), "category_ids"),
                        ColSpec("string", "error", required=False)]))


def model_requirements() -> list[str]:
    """``MODEL_DISTRIBUTIONS`` pinned to the installed versions (a local build tag such as
    ``+cpu`` dropped: package indexes serve the plain version)."""
    return [f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in MODEL_DISTRIBUTIONS]


def frcnn_code(folder: Path) -> str:
    """A copy of the ``frcnn`` package (sources and bundled configs, no bytecode) under ``folder``:
    the code the registered model carries."""
    import frcnn

    dst = folder / "frcnn"
    shutil.copytree(Path(frcnn.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(dst)


def register_model(checkpoint_file: str, model_name: str) -> str | None:
    """Log the pyfunc (code + checkpoint + its own copy of ``frcnn``) in the active run and register
    it; returns the version."""
    import warnings

    with tempfile.TemporaryDirectory(prefix="frcnn-code-") as code, warnings.catch_warnings():
        # An input example would be encoded image bytes, and validating it loads the model in a
        # subprocess (slow); the explicit signature already describes the input.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = tracking.safe(
            mlflow.pyfunc.log_model,
            name="model",
            python_model=PYFUNC_CODE,
            artifacts={"checkpoint": checkpoint_file},
            code_paths=[frcnn_code(Path(code))],
            registered_model_name=model_name,
            signature=pyfunc_signature(),
            # Listed, not inferred: inference would load the model in a subprocess (slow).
            pip_requirements=model_requirements(),
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
    mv = registry_version(ref, client)
    if mv is not None:
        folder = _download(f"models:/{mv.name}/{mv.version}")
        return ModelRef(ref, str(_find_checkpoint(folder)), mv.name, str(mv.version), mv.run_id)
    path = Path(ref)
    if path.exists():
        return ModelRef(ref, str(path if path.is_file() else _find_checkpoint(path)))
    if _RUN_ID.match(ref):
        client.get_run(ref)  # raises a clear MLflow error for an unknown run
        for sub in ("checkpoints/best", "checkpoints/final"):
            try:
                folder = _download(f"runs:/{ref}/{sub}")
            except Exception:  # noqa: BLE001 - try the next location
                continue
            return ModelRef(ref, str(_find_checkpoint(folder)), run_id=ref)
        raise FileNotFoundError(f"run {ref} has no checkpoints/best or checkpoints/final artifact")
    raise ModelRefError(f"{ref}: not a models:/ URI, an MLflow run id, or an existing checkpoint path")


def load_model(ref: str | ModelRef, device: str = "cpu"):
    """``(FasterRCNN in eval mode, ModelRef)`` for a MODEL reference."""
    from frcnn.inference import load_model as load

    resolved = ref if isinstance(ref, ModelRef) else resolve_model(ref)
    return load(resolved.checkpoint, device), resolved


# --------------------------------------------------------------------------- promotion


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    promoted: bool
    message: str
    metric: str | None = None
    candidate_value: float | None = None
    incumbent_version: str | None = None
    incumbent_value: float | None = None
    candidate_run_id: str | None = None
    incumbent_run_id: str | None = None


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def latest_evaluation(client, name: str, version: str, *, split: str, dataset: str = "voc",
                      data_root: str | None = None, years: str | None = None):
    """The latest FINISHED evaluation run of a model version on a dataset and split (optionally a
    data root and years), across every experiment; None when there is none."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return None
    filt = (f"tags.`frcnn.job` = 'evaluate' and tags.`frcnn.model_name` = {_q(name)} and "
            f"tags.`frcnn.model_version` = {_q(version)} and tags.`frcnn.split` = {_q(split)} and "
            f"tags.`frcnn.dataset` = {_q(dataset)} and attributes.status = 'FINISHED'")
    runs = client.search_runs(experiments, filt, run_view_type=ViewType.ACTIVE_ONLY, max_results=200,
                              order_by=["attributes.start_time DESC"])
    for run in runs:  # data root and years compared here: paths may hold quotes
        t = run.data.tags
        if data_root is not None and t.get("frcnn.data_root") != data_root:
            continue
        if years is not None and t.get("frcnn.years", "all") != years:
            continue
        return run
    return None


def _describe(name: str, version: str, dataset: str, split: str, data_root: str | None) -> str:
    return f"models:/{name}/{version} on {dataset}/{split}" + (f" at {data_root}" if data_root else "")


def _evaluation(client, name, version, metric, what, *, split, dataset, data_root, years=None):
    run = latest_evaluation(client, name, version, split=split, dataset=dataset, data_root=data_root, years=years)
    if run is None:
        raise PromotionError(
            f"no FINISHED evaluation run of {what}{_describe(name, version, dataset, split, data_root)}"
            + (f" (years {years})" if years else "") + f": run `frcnn-jobs evaluate --model models:/{name}/{version} "
            f"--dataset {dataset} --split {split} --data-root {data_root or '...'}` first")
    if metric not in run.data.metrics:
        raise PromotionError(f"evaluation run {run.info.run_id} of models:/{name}/{version} has no metric "
                             f"{metric!r} (it has {sorted(run.data.metrics)})")
    return run, float(run.data.metrics[metric])


@dataclass(frozen=True)
class _Comparison:
    """What a conditional promotion compares: one metric of evaluations on one dataset and split."""

    rival: str  # the alias whose holder the candidate must beat
    metric: str
    split: str
    dataset: str
    data_root: str | None


def _candidate(client, model: str) -> tuple[str, str]:
    """MODEL (models:/NAME/VERSION or NAME/VERSION) -> (name, version), or a PromotionError."""
    try:
        mv = registry_version(model, client, bare=True)
    except (MlflowException, ModelRefError) as exc:
        raise PromotionError(f"{model}: no such registered model version ({getattr(exc, 'message', exc)})") from exc
    if mv is None:
        raise PromotionError(f"{model}: expected a registry version, models:/NAME/VERSION or NAME/VERSION")
    return mv.name, str(mv.version)


def _holder(client, name: str, alias: str) -> str | None:
    """The version holding ``alias``; None when nobody holds it."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _compare(client, res: PromotionResult, cmp: _Comparison, previous: str | None, out) -> None:
    """Fill ``res`` with both evaluations and the decision: promote only a strictly better
    candidate, or any candidate when nobody holds ``cmp.rival``."""
    name, version, metric = res.name, res.version, cmp.metric
    res.metric = metric
    cand, res.candidate_value = _evaluation(client, name, version, metric, "", split=cmp.split,
                                            dataset=cmp.dataset, data_root=cmp.data_root)
    res.candidate_run_id = cand.info.run_id
    incumbent = _holder(client, name, cmp.rival)
    if incumbent is None:
        res.promoted = True
        res.message = (f"nobody holds @{cmp.rival} yet: promoting models:/{name}/{version} "
                       f"({metric}={res.candidate_value:.4f}, run {res.candidate_run_id})")
        return
    res.incumbent_version = incumbent
    # The incumbent is judged on the candidate's data root and years.
    root, years = cand.data.tags.get("frcnn.data_root"), cand.data.tags.get("frcnn.years", "all")
    inc, res.incumbent_value = _evaluation(client, name, incumbent, metric, f"the @{cmp.rival} version ",
                                           split=cmp.split, dataset=cmp.dataset, data_root=root, years=years)
    res.incumbent_run_id = inc.info.run_id
    out(f"{metric} on {cmp.dataset}/{cmp.split}: candidate models:/{name}/{version} = {res.candidate_value:.4f} "
        f"(run {res.candidate_run_id}) vs @{cmp.rival} models:/{name}/{incumbent} = "
        f"{res.incumbent_value:.4f} (run {res.incumbent_run_id})")
    if incumbent == version:
        res.message = f"models:/{name}/{version} already holds @{cmp.rival}: nothing to compare"
    elif res.candidate_value > res.incumbent_value:
        res.promoted = True
        res.message = f"{res.candidate_value:.4f} > {res.incumbent_value:.4f}: promoting"
    else:
        res.message = (f"NOT promoted: {res.candidate_value:.4f} is not better than {res.incumbent_value:.4f}; "
                       f"@{res.alias} stays on {'version ' + previous if previous else 'nobody'}")


def _move_alias(client, res: PromotionResult, previous: str | None) -> None:
    client.set_registered_model_alias(res.name, res.alias, res.version)
    done = f"models:/{res.name}@{res.alias} -> version {res.version}" + (f" (was {previous})" if previous else "")
    res.message = f"{res.message}; {done}" if res.message else done


def promote(model: str, alias: str, *, if_better_than: str | None = None, metric: str = "map50",
            split: str = "test", dataset: str = "voc", data_root: str | None = None,
            tracking_uri: str | None = None, client=None, verbose: bool = True) -> PromotionResult:
    """Point ``alias`` at a model version, unconditionally or only when it beats ``if_better_than``."""
    from pipelines.storage import shown

    if tracking_uri or client is None:
        mlflow.set_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    client = client or MlflowClient()
    name, version = _candidate(client, model)
    out = print if verbose else (lambda *a, **k: None)
    previous = _holder(client, name, alias)
    res = PromotionResult(name, version, alias, False, "")
    if if_better_than:
        cmp = _Comparison(if_better_than, metric, split, dataset, shown(data_root) if data_root else None)
        _compare(client, res, cmp, previous, out)
    else:
        res.promoted = True
    if res.promoted:
        _move_alias(client, res, previous)
    out(res.message, flush=True)
    return res


@click.command("promote")
@click.argument("model", metavar="MODEL")
@click.option("--alias", required=True, help="Alias to set, e.g. champion.")
@click.option("--if-better-than", metavar="ALIAS", default=None,
              help="Only if MODEL's latest evaluation beats that of the version holding ALIAS (or nobody holds it).")
@click.option("--metric", default="map50", show_default=True, help="Evaluation metric to compare (higher is better).")
@click.option("--split", default="test", show_default=True)
@click.option("--dataset", type=click.Choice(FORMATS), default="voc", show_default=True,
              help="The layout of the evaluations to compare (as given to evaluate).")
@click.option("--data-root", metavar="PATH", default=None,
              help="Compare evaluations on this data root. Default: the candidate's latest evaluation's.")
def promote_cmd(model, alias, if_better_than, metric, split, dataset, data_root):
    """Point a registry alias at MODEL (models:/NAME/VERSION or NAME/VERSION).

    A candidate that is not strictly better is reported and exits 0 with the alias unchanged; a
    missing evaluation exits 1."""
    promote(model, alias, if_better_than=if_better_than, metric=metric, split=split, dataset=dataset,
            data_root=data_root)


COMMANDS = [promote_cmd]
