"""``frcnn-jobs export``: each exported graph, run by its own runtime, finds what
``frcnn.inference.Detector`` finds on the same images.

The detector is initialised, not trained, with its four predictor layers scaled up so that scores
and boxes spread out (an initialised head scores every class about 1/C: near ties, whose order a
different runtime may flip). It has two canvas buckets, so the export writes two graphs. The test
images fill their bucket: padding is uniform, and equal features there give exactly equal scores,
which two runtimes may break differently.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN, tiny_config
from frcnn.config import CanvasConfig
from frcnn.inference import Detector
from frcnn.training import TrainConfig, checkpoint_state
from jobs.export import ExportError, export_model
from tests.test_registered_model import jpeg_image as _jpeg

pytestmark = pytest.mark.integration

BUCKETS = ((128, 160), (160, 128))
CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


# (w, h): exactly 160x128 or 128x160 at their scale (1, 0.8, 1.25).
IMAGES = [_jpeg(160, 128, 1), _jpeg(200, 160, 2), _jpeg(128, 160, 3), _jpeg(96, 120, 4)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    cfg = tiny_config(num_classes=5, class_names=CLASSES)
    cfg = dataclasses.replace(cfg, canvas=CanvasConfig(height=128, width=160, buckets=BUCKETS))
    torch.manual_seed(0)
    model = FasterRCNN(cfg)
    with torch.no_grad():
        for layer in (model.rpn_head.cls_logits, model.rpn_head.bbox_pred, model.roi_heads.cls_score,
                      model.roi_heads.bbox_pred):
            layer.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("model") / "checkpoint.pt"
    torch.save(checkpoint_state(model, None, 0, 0, cfg, TrainConfig()), path)
    return str(path)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The Detector's detections, one image per call (a batch of one, as the graphs run)."""
    detector = Detector.from_checkpoint(checkpoint, "cpu")
    found = [detector.predict([data])[0] for data in IMAGES]
    assert all(len(d.scores) > 10 for d in found)
    return found


def _caller_inputs(data: bytes, meta: dict) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """What export.json tells the caller to do (no scale rule here), written independently of frcnn."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    h, w = image.height, image.width
    best = None
    for hc, wc in meta["canvases"]:
        scale = min(hc / h, wc / w)
        rh, rw = min(hc, max(1, round(h * scale))), min(wc, max(1, round(w * scale)))
        padding = 1 - rh * rw / (hc * wc)
        if best is None or padding < best[0]:
            best = (padding, hc, wc, scale, rh, rw)
    _, hc, wc, scale, rh, rw = best
    canvas = np.zeros((hc, wc, 3), np.uint8)
    canvas[:rh, :rw] = np.asarray(image.resize((rw, rh), Image.BILINEAR))
    return f"{hc}x{wc}", canvas, np.array([scale], np.float32), np.array([h, w], np.int64)


def _assert_same(got: list, d) -> None:
    boxes, scores, labels = (np.asarray(v) for v in got)
    assert labels.tolist() == d.labels.tolist()
    assert np.abs(boxes - d.boxes).max() <= 0.01
    assert np.abs(scores - d.scores).max() <= 1e-4


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """format -> export folder (the model is a checkpoint file: nothing to log it to)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt in ("onnx", "torchscript"):
        res = export_model(checkpoint, fmt, str(root / fmt), verbose=False)
        assert res.canvases == BUCKETS and res.logged_to is None
        out[fmt] = root / fmt
    return out


def test_onnx_graphs_in_onnxruntime_match_the_detector(exported, expected):
    import onnxruntime as ort

    meta = json.loads((exported["onnx"] / "export.json").read_text())
    assert meta["canvases"] == [list(b) for b in BUCKETS] and meta["class_names"] == list(CLASSES)
    sessions = {name: ort.InferenceSession(str(exported["onnx"] / rel), providers=["CPUExecutionProvider"])
                for name, rel in meta["files"].items()}
    used = set()
    for data, d in zip(IMAGES, expected, strict=True):
        name, canvas, scale, size = _caller_inputs(data, meta)
        used.add(name)
        _assert_same(sessions[name].run(None, {"canvas": canvas, "scale": scale, "image_size": size}), d)
    assert used == {"128x160", "160x128"}


# ``python -I -S`` with the venv's site-packages appended plainly: torch and torchvision, no frcnn.
_RUN_TORCHSCRIPT = r"""
import sys
sys.path.append(sys.argv[1])
try:
    import frcnn
except ImportError:
    pass
else:
    raise SystemExit("frcnn is importable")
import torch, torchvision  # torchvision registers the nms / roi_align operators the graphs call
cases = torch.load(sys.argv[2], weights_only=True)
graphs = {}
out = []
for name, inputs in cases:
    if name not in graphs:
        graphs[name] = torch.jit.load(f"{sys.argv[3]}/{name}/model.pt")
    out.append([t.numpy().tolist() for t in graphs[name](*inputs)])
torch.save(out, sys.argv[4])
"""


def test_torchscript_graphs_in_a_fresh_process_match_the_detector(exported, expected, tmp_path):
    meta = json.loads((exported["torchscript"] / "export.json").read_text())
    cases = []
    for data in IMAGES:
        name, canvas, scale, size = _caller_inputs(data, meta)
        cases.append((name, [torch.from_numpy(canvas), torch.from_numpy(scale), torch.from_numpy(size)]))
    torch.save(cases, tmp_path / "cases.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _RUN_TORCHSCRIPT, sysconfig.get_paths()["purelib"],
                           str(tmp_path / "cases.pt"), str(exported["torchscript"]), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for (boxes, scores, labels), d in zip(got, expected, strict=True):
        _assert_same([np.asarray(boxes, np.float32).reshape(-1, 4), scores, labels], d)


def test_cli_export_logs_the_onnx_flavour_to_the_training_run(checkpoint, expected, tmp_path, tracking_uri):
    """MODEL as a training run id: the export lands at --out and in the run's artifacts as one
    MLflow ONNX model per bucket; a second export to the same --out is refused in one line."""
    import mlflow
    from click.testing import CliRunner

    from jobs.cli import main

    mlflow.set_experiment("export")
    with mlflow.start_run() as run:
        mlflow.log_artifact(checkpoint, "checkpoints/best")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", "--model", run.info.run_id, "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"logged to runs:/{run.info.run_id}/exports/onnx" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["128x160", "160x128", "export.json"]

    flavour = mlflow.onnx.load_model(f"runs:/{run.info.run_id}/exports/onnx/160x128")
    import onnxruntime as ort

    meta = json.loads((out / "export.json").read_text())
    name, canvas, scale, size = _caller_inputs(IMAGES[2], meta)
    assert name == "160x128"
    session = ort.InferenceSession(flavour.SerializeToString(), providers=["CPUExecutionProvider"])
    _assert_same(session.run(None, {"canvas": canvas, "scale": scale, "image_size": size}), expected[2])

    again = CliRunner().invoke(main, ["export", "--model", run.info.run_id, "--format", "onnx", "--out", str(out)])
    assert again.exit_code == 1 and "exists and is not empty" in again.output
    assert "Traceback" not in again.output


def test_unknown_format_is_refused(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--format tflite"):
        export_model(checkpoint, "tflite", str(tmp_path / "x"), verbose=False)
