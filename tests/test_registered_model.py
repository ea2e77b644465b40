"""The registered model outside this project: loaded where ``frcnn``/``jobs``/``pipelines`` are not
installed, and served by MLflow's own scoring server over REST.

One tiny detector (initialised, not trained: the plumbing is under test, the numbers come from
``frcnn.inference.Detector`` on the same checkpoint) is registered once in a temporary sqlite store.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN, tiny_config
from frcnn.inference import Detector
from frcnn.training import TrainConfig, checkpoint_state

pytestmark = pytest.mark.integration

CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")
VENV_BIN = str(Path(sys.executable).parent)


def jpeg_image(w: int, h: int, seed: int) -> bytes:
    """A noisy JPEG (no two places alike: no exactly tied scores) with one flat red block."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels[h // 4: h // 2, w // 5: w // 2] = (220, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


IMAGES = [jpeg_image(150, 100, 1), b"\x89PNG\r\n\x1a\n not really a png", jpeg_image(90, 160, 2)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, _empty_tracking_db):
    """(tracking URI, checkpoint path): version 1 of ``frcnn-test``, alias ``champion``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.models import register_model

    root = tmp_path_factory.mktemp("registry")
    shutil.copyfile(_empty_tracking_db, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = tiny_config(num_classes=5, class_names=CLASSES, canvas=128)
    torch.manual_seed(0)
    ckpt = root / "checkpoint.pt"
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), ckpt)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("registry")
        with mlflow.start_run():
            assert register_model(str(ckpt), "frcnn-test") == "1"
        MlflowClient(uri).set_registered_model_alias("frcnn-test", "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri, str(ckpt)


@pytest.fixture(scope="module")
def expected(registered):
    """What the in-process Detector finds on IMAGES with the same checkpoint."""
    return Detector.from_checkpoint(registered[1], "cpu").predict(IMAGES)


def _same_detections(row: dict, d) -> None:
    assert row["labels"] == d.labels.tolist()
    np.testing.assert_allclose(np.asarray(row["boxes"], np.float64).reshape(-1, 4), d.boxes, atol=1e-4)
    np.testing.assert_allclose(row["scores"], d.scores, atol=1e-6)
    assert row["class_names"] == [CLASSES[k - 1] for k in d.labels]
    assert row["category_ids"] == d.labels.tolist()  # a model trained without ids answers its labels


def test_registered_model_carries_its_code_and_pinned_requirements(registered):
    import mlflow

    mlflow.set_tracking_uri(registered[0])
    local = Path(mlflow.artifacts.download_artifacts("models:/frcnn-test/1"))
    requirements = (local / "requirements.txt").read_text().split()
    names = sorted(r.split("==")[0] for r in requirements if not r.startswith("-"))
    assert names == sorted(["torch", "torchvision", "pillow", "numpy", "pyyaml", "pandas", "mlflow"]), requirements
    assert all("==" in r for r in requirements), requirements
    assert (local / "code" / "frcnn" / "inference.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))


# Run with ``python -I -S``: no PYTHONPATH, no current directory, and none of the venv's .pth files
# (the editable install's import hook lives in one); the venv's site-packages (argv[1]) is appended
# plainly.
_LOAD_ISOLATED = r"""
import json, sys
sys.path.append(sys.argv[1])
for name in ("frcnn", "jobs", "pipelines"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable before the model is loaded")
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/frcnn-test@champion")
images = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
out = model.predict(pd.DataFrame({"image": images}))
import frcnn
for name in ("jobs", "pipelines"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable after the model is loaded")
print(json.dumps({"frcnn": frcnn.__file__, "rows": out.to_dict(orient="records")}))
"""


def test_registered_model_loads_and_predicts_without_this_project(registered, expected, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = registered[0]
    site_packages = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _LOAD_ISOLATED, site_packages], input=json.dumps(
        [b.hex() for b in IMAGES]), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The model's own copy of frcnn: <model>/code/frcnn/__init__.py, beside the model's MLmodel.
    model_dir = Path(out["frcnn"]).parents[2]
    assert Path(out["frcnn"]).parent == model_dir / "code" / "frcnn"
    assert (model_dir / "MLmodel").is_file()
    rows = out["rows"]
    assert len(rows) == 3
    for row, d in zip(rows, expected, strict=True):
        assert row["error"] == d.error
        if d.error is None:
            _same_detections(row, d)
    assert rows[1]["error"].startswith("unreadable image") and rows[1]["boxes"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _wait_until_up(proc: subprocess.Popen, port: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping within {deadline_s} s")


def test_scoring_server_answers_null_errors_and_the_detections(registered, expected, tmp_path):
    """``mlflow models serve`` (MLflow's own server, this environment) on 127.0.0.1: a request in
    ``dataframe_split`` format with one corrupt image gets strict JSON, ``null`` errors for the good
    images, the reason for the corrupt one, and the in-process detections."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=registered[0], PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/frcnn-test@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_until_up(proc, port, 240)
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(b).decode()] for b in IMAGES]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    rows = _strict_json(text)["predictions"]
    assert '"error": null' in text
    assert [row["error"] is None for row in rows] == [True, False, True]
    assert rows[1]["error"].startswith("unreadable image") and rows[1]["boxes"] == []
    for row, d in zip(rows, expected, strict=True):
        if d.error is None:
            _same_detections(row, d)
