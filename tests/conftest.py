"""Fixtures shared by the whole suite: the Ray session, the synthetic dataset, the tracking store,
a tiny trained model and the one-thread setting.

Tiers (registered in pyproject.toml): a module that needs Ray, MLflow, a server or a subprocess of
``frcnn-jobs`` carries ``pytestmark = pytest.mark.integration``; the cluster rehearsal carries
``pytest.mark.cluster``; unmarked modules are the fast unit tier (``make test-fast``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

# A shell that runs the suite in the background (`make test &`, `nohup ... &`) starts it with SIGINT
# ignored, and an ignored signal stays ignored across fork and exec: the Ctrl-C tests' subprocesses
# would never see the interrupt they are sent (and would run to the end, exit status 0). With a
# handler here, the children start with SIGINT at its default, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


SLOW_FIXTURES = {"ray_session", "tracking_uri"}


def pytest_collection_modifyitems(config, items):
    """Keep the unit tier fast: a test that starts Ray or opens a tracking store must be marked."""
    unmarked = [item.nodeid for item in items if SLOW_FIXTURES & set(item.fixturenames)
                and item.get_closest_marker("integration") is None and item.get_closest_marker("cluster") is None]
    if unmarked:
        raise pytest.UsageError("tests using Ray or a tracking store need pytest.mark.integration: "
                                + ", ".join(unmarked[:5]))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray.

    Four logical CPUs on a 2-core machine: two training workers take one each, and Ray Data's
    read/decode tasks still need slots beside them (with only 2, they would wait forever).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One intra-op torch thread: the machine is shared, and small convolutions gain nothing from
    more (modules use it with ``pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the synthetic dataset ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Synth:
    """A generated VOC-layout dataset (``pipelines.synth.generate``) and the summary it returned."""

    root: Path
    summary: dict[str, Any]


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """``synth_dataset(**generate_kwargs) -> Synth``: the synthetic dataset for those arguments,
    generated once per session and shared, so tests read it and never write into it (copy it
    first to damage it)."""
    from pipelines.synth import generate

    made: dict[str, Synth] = {}

    def make(n_images: int = 24, seed: int = 3, min_size: int = 64, max_size: int = 128,
             sizes: tuple[tuple[int, int], ...] | None = None) -> Synth:
        kwargs = {"n_images": n_images, "seed": seed, "min_size": min_size, "max_size": max_size, "sizes": sizes}
        key = repr(sorted(kwargs.items()))
        if key not in made:
            root = tmp_path_factory.mktemp("synth")
            made[key] = Synth(root, generate(root, **kwargs))
        return made[key]

    return make


# ---- the tracking store -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def _empty_tracking_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables created once (the migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("tracking-template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def tracking_uri(_empty_tracking_db, tmp_path_factory, monkeypatch) -> str:
    """A fresh MLflow SQLite store for this test (a copy of the empty one, in a folder of its own:
    the test's ``tmp_path`` stays empty), set as the tracking URI of this process and, through
    ``MLFLOW_TRACKING_URI``, of its subprocesses."""
    import mlflow

    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    shutil.copyfile(_empty_tracking_db, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():  # a failing test must not leave a run open for the next one
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# ---- a tiny trained model -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_trained_model():
    """``tiny_trained_model(n_images=4, steps=200) -> tests.shapes.TinyTrained``: the tiny
    detector overfitted on that many generated canvases, trained once per session; each call
    hands out its own copy of the model."""
    from tests.shapes import overfit

    trained: dict[tuple[int, int], Any] = {}

    def get(n_images: int = 4, steps: int = 200):
        if (n_images, steps) not in trained:
            trained[n_images, steps] = overfit(n_images, steps)
        return dataclasses.replace(trained[n_images, steps], model=copy.deepcopy(trained[n_images, steps].model))

    return get
