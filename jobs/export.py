"""``frcnn-jobs export``: a trained model as a graph that a serving stack runs without this package.

    frcnn-jobs export --model models:/frcnn@champion --format onnx --out exports/frcnn-onnx
    frcnn-jobs export --model models:/frcnn@champion --format torchscript --out s3://bucket/frcnn-ts

One graph per canvas (bucket), each ``frcnn.export.ExportableDetector`` traced on that canvas:
normalisation, the whole detector, NMS and the mapping back to the image's pixels are inside; the
caller decodes the image and puts it on the canvas (``CALLER_STEPS``). Formats:

- ``onnx``: ``torch.onnx.export(dynamo=False)`` (opset 17; torchvision's ``nms`` and
  ``roi_align`` become ONNX ``NonMaxSuppression`` and ``RoiAlign``), run by onnxruntime. Each
  graph is saved as an MLflow ONNX-flavour model.
- ``torchscript``: ``torch.jit.trace``, loaded with ``torch.jit.load`` (torch and torchvision only).

Layout, at ``--out`` and (when MODEL belongs to a training run) under that run's artifacts at
``exports/<format>/``::

    export.json              format, canvases, the caller's steps, classes, the model it came from
    <H>x<W>/model.onnx       onnx: an MLflow ONNX model folder (MLmodel, model.onnx, requirements)
    <H>x<W>/model.pt         torchscript

Before anything is written, each graph is run once in its runtime and compared with the eager
module on a test canvas; a mismatch fails the export. ``--out`` must not exist yet (or be empty):
the files are written to a staging folder first, then copied.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import options, tracking

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_OPSET = 17  # RoiAlign with aligned=True (half-pixel) needs opset 16 or later
INPUTS = {
    "canvas": "(Hc, Wc, 3) uint8 RGB: the image resized by `scale` (PIL bilinear) to "
              "(round(h*scale), round(w*scale)), placed top-left, the rest zeros",
    "scale": "(1,) float32: the resize factor",
    "image_size": "(2,) int64: the original image's [h, w]",
}
OUTPUTS = {
    "boxes": "(N, 4) float32 [x1, y1, x2, y2] in the original image's pixels",
    "scores": "(N,) float32, best first",
    "labels": "(N,) int64, 1..C (class_names[label - 1])",
}
CALLER_STEPS = (
    "decode the image as frcnn.images.decode_image does (EXIF orientation applied, 8-bit RGB, transparency "
    "over white): h x w",
    "for each canvas Hc x Wc: scale = min(Hc / h, Wc / w), and with short_side and max_long_side set "
    "scale = min(scale, short_side / min(h, w), max_long_side / max(h, w)); "
    "rh = min(Hc, max(1, round(h * scale))), rw = min(Wc, max(1, round(w * scale))) (Python's round: "
    "half to even)",
    "pick the canvas: with short_side set, the largest scale first; then the least padding "
    "1 - rh * rw / (Hc * Wc); ties to the first listed",
    "resize the image to rw x rh with PIL's BILINEAR filter and paste it at (0, 0) on a zero Hc x Wc canvas",
    "run the canvas's graph on (canvas, [scale], [h, w])",
)


class ExportError(click.ClickException):
    """An export that cannot be made (unknown format, a graph that does not match the model...)."""


@dataclass(frozen=True)
class ExportResult:
    out: str
    canvases: tuple[tuple[int, int], ...]
    logged_to: str | None  # runs:/RUN/exports/FORMAT, or None when MODEL has no training run


def example_inputs(canvas_hw: tuple[int, int], seed: int = 0, scale: float = 1.0) -> tuple:
    """A random canvas with the inputs of an image shown at ``scale`` that fills it: what a graph is
    traced on (seed 0, scale 1) and checked on (another seed and scale, so that nothing the trace
    saw is reused)."""
    import torch

    h, w = canvas_hw
    gen = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)
    size = torch.tensor([max(1, round(h / scale)), max(1, round(w / scale))], dtype=torch.int64)
    return canvas, torch.tensor([scale]), size


def check_inputs(canvas_hw: tuple[int, int]) -> tuple:
    return example_inputs(canvas_hw, seed=1, scale=1.25)


def _check(name: str, got: list, want: tuple) -> None:
    """The runtime's outputs against the eager module's on ``check_inputs``: the same number of
    detections, the same scores (within 1e-4, compared sorted: detections of nearly equal score may
    come in another order) and the same boxes and labels by score (within 0.01 px)."""
    import numpy as np

    boxes, scores, labels = (np.asarray(v) for v in got)
    w_boxes, w_scores, w_labels = (v.numpy() for v in want)
    if len(scores) != len(w_scores) or not np.allclose(np.sort(scores), np.sort(w_scores), rtol=0, atol=1e-4):
        raise ExportError(f"{name}: the exported graph's detections differ from the model's "
                          f"({len(scores)} vs {len(w_scores)} detections)")
    # The best detection has no near tie in a working model: it must be the same box and label.
    if len(scores) and (labels[0] != w_labels[0] or np.abs(boxes[0] - w_boxes[0]).max() > 0.01):
        raise ExportError(f"{name}: the exported graph's best detection differs from the model's")


def _onnx(module, inputs, folder: Path, meta: dict[str, Any]) -> None:
    import mlflow.onnx
    import onnx
    import onnxruntime as ort
    import torch

    raw = folder.with_suffix(".raw.onnx")
    torch.onnx.export(module, inputs, str(raw), dynamo=False, opset_version=ONNX_OPSET,
                      input_names=list(INPUTS), output_names=list(OUTPUTS))
    session = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    probe = check_inputs(module.canvas_hw)
    _check(folder.name, session.run(None, dict(zip(INPUTS, (t.numpy() for t in probe), strict=True))),
           module(*probe))
    # One file per graph (ONNX's 2 GB protobuf limit holds even for VGG16).
    mlflow.onnx.save_model(onnx.load(str(raw)), str(folder), metadata=meta, save_as_external_data=False)
    raw.unlink()


def _torchscript(module, inputs, folder: Path, meta: dict[str, Any]) -> None:
    import torch

    folder.mkdir()
    path = folder / FILES["torchscript"]
    traced = torch.jit.trace(module, inputs, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"export.json": json.dumps(meta)})
    probe = check_inputs(module.canvas_hw)
    _check(folder.name, [t.numpy() for t in torch.jit.load(str(path))(*probe)], module(*probe))


def _metadata(fmt: str, model, ref) -> dict[str, Any]:
    import torch
    import torchvision

    c = model.cfg.canvas
    return {
        "format": fmt, "canvases": [list(s) for s in c.sizes],
        "files": {f"{h}x{w}": f"{h}x{w}/{FILES[fmt]}" for h, w in c.sizes},
        "short_side": c.short_side, "max_long_side": c.max_long_side,
        "class_names": list(model.cfg.class_names), "inputs": INPUTS, "outputs": OUTPUTS,
        "caller_steps": list(CALLER_STEPS),
        "model": {"uri": ref.uri, "name": ref.name, "version": ref.version, "run_id": ref.run_id},
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
        **({"onnx_opset": ONNX_OPSET} if fmt == "onnx" else {}),
    }


def write_graphs(model, ref, fmt: str, staging: Path, say=print) -> dict[str, Any]:
    """Every canvas's graph, checked, under ``staging``; returns the metadata (also export.json)."""
    import torch

    from frcnn.export import ExportableDetector

    meta = _metadata(fmt, model, ref)
    writer = {"onnx": _onnx, "torchscript": _torchscript}[fmt]
    with torch.no_grad():
        for h, w in model.cfg.canvas.sizes:
            say(f"exporting the {h}x{w} canvas as {fmt}", flush=True)
            # Parameters without grad: a loaded graph's outputs must not require it either.
            module = ExportableDetector(model, (h, w)).eval().requires_grad_(False)
            writer(module, example_inputs((h, w)), staging / f"{h}x{w}",
                   {**meta, "canvas": f"{h}x{w}"})
    (staging / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _destination(out: str):
    """``out``'s (filesystem, path), refused when something is already there."""
    import pyarrow.fs as pafs

    from pipelines.storage import resolve_filesystem

    fs, path = resolve_filesystem(out)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File or (
            info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path))):
        raise ExportError(f"{out}: exists and is not empty; give a new --out")
    return fs, path


def _publish(staging: Path, out: str) -> None:
    """Copy the staged files to ``out`` (a folder or a URI pyarrow writes), which must be empty."""
    import pyarrow.fs as pafs

    fs, path = _destination(out)
    fs.create_dir(path)
    pafs.copy_files(str(staging), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _log(staging: Path, ref, fmt: str, meta: dict[str, Any]) -> str | None:
    """Log the export to the model's training run; tag the model version with where it is."""
    from mlflow.tracking import MlflowClient

    if not ref.run_id:
        return None
    client = MlflowClient()
    client.log_artifacts(ref.run_id, str(staging), f"exports/{fmt}")
    where = f"runs:/{ref.run_id}/exports/{fmt}"
    if ref.name and ref.version:
        client.set_model_version_tag(ref.name, ref.version, f"export.{fmt}", where)
        client.set_model_version_tag(ref.name, ref.version, f"export.{fmt}.canvases",
                                     " ".join(f"{h}x{w}" for h, w in meta["canvases"]))
    return where


def export_model(model_uri: str, fmt: str, out: str, *, tracking_uri: str | None = None,
                 verbose: bool = True) -> ExportResult:
    """Export MODEL in ``fmt`` to ``out`` and log it to the model's training run (when it has one)."""
    from .models import load_model, resolve_model

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    say = print if verbose else (lambda *a, **k: None)
    import mlflow

    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(tracking_uri))
    _destination(out)  # refused before any work
    ref = resolve_model(model_uri)
    model, _ = load_model(ref, "cpu")
    with tempfile.TemporaryDirectory(prefix="frcnn-export-") as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        meta = write_graphs(model, ref, fmt, staging, say)
        _publish(staging, out)
        logged = _log(staging, ref, fmt, meta)
    say(f"wrote {out}" + (f"; logged to {logged}" if logged else " (MODEL has no training run: not logged)"))
    return ExportResult(out, model.cfg.canvas.sizes, logged)


@click.command("export")
@options.MODEL
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="onnx (onnxruntime) or torchscript (torch.jit.load).")
@click.option("--out", required=True, metavar="URI", help="A new folder or object-store prefix for the export.")
def export_cmd(model_uri, fmt, out):
    """Export MODEL as one self-contained graph per canvas (bucket), with an export.json saying what
    the caller does before the graph (decode, resize onto the canvas) and what it returns."""
    if not model_uri:
        raise click.UsageError("--model is required")
    export_model(model_uri, fmt, out)


COMMANDS = [export_cmd]
