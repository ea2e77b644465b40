"""Batched detection with Ray Data: a callable class that loads the model once per actor.

Shared by ``frcnn-jobs evaluate`` (over a VOC split) and ``frcnn-jobs infer`` (over a folder,
prefix or Parquet table of images). Rows in: ``image_id`` and ``image`` (the encoded file bytes).
Rows out: ``image_id``, ``boxes`` (list<float32>, N x 4 flattened, ORIGINAL image pixels xyxy),
``scores`` (list<float32>), ``labels`` (list<int32>), ``height``, ``width`` and ``error`` (null, or
why the image could not be read: an unreadable file is a row with a reason, never a dead job).

    ds = ray.data.from_items(rows).map_batches(
        Predictor, fn_constructor_kwargs={"checkpoint": ckpt_bytes},
        batch_size=8, compute=ray.data.ActorPoolStrategy(size=2))
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from frcnn.canvas import to_tensor
from frcnn.training import load_checkpoint, model_from_checkpoint


def read_image(data: bytes) -> Image.Image:
    """Decode any PIL-readable image fully (greyscale, palette and RGBA become RGB)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class Predictor:
    def __init__(self, checkpoint: str | bytes, device: str | None = None, score_threshold: float | None = None,
                 torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        src = io.BytesIO(checkpoint) if isinstance(checkpoint, (bytes, bytearray)) else checkpoint
        state = load_checkpoint(src)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model_from_checkpoint(state).to(self.device).eval()
        self.score_threshold = score_threshold

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        model = self.model
        n = len(batch["image_id"])
        out: dict[str, list] = {k: [] for k in ("image_id", "boxes", "scores", "labels", "height", "width", "error")}
        canvases, scales, sizes, errors = [], [], [], []
        for i in range(n):
            try:
                image = read_image(batch["image"][i])
            except Exception as exc:  # noqa: BLE001 - any decoder error is a reported row
                errors.append(f"unreadable image: {type(exc).__name__}: {exc}")
                continue
            canvas, scale = model.canvas.apply_image(image)
            canvases.append(to_tensor(canvas))
            scales.append(scale)
            sizes.append((image.height, image.width))
            errors.append(None)
        dets = iter(model.detect(torch.stack(canvases).to(self.device), scales, sizes) if canvases else [])
        size_it = iter(sizes)
        for i in range(n):
            out["image_id"].append(str(batch["image_id"][i]))
            if errors[i] is not None:
                out["boxes"].append(np.zeros(0, np.float32))
                out["scores"].append(np.zeros(0, np.float32))
                out["labels"].append(np.zeros(0, np.int32))
                out["height"].append(-1)
                out["width"].append(-1)
                out["error"].append(errors[i])
                continue
            d = next(dets)
            h, w = next(size_it)
            keep = d["scores"] >= self.score_threshold if self.score_threshold is not None else slice(None)
            out["boxes"].append(d["boxes"][keep].float().cpu().numpy().reshape(-1).astype(np.float32))
            out["scores"].append(d["scores"][keep].float().cpu().numpy().astype(np.float32))
            out["labels"].append(d["labels"][keep].cpu().numpy().astype(np.int32))
            out["height"].append(h)
            out["width"].append(w)
            out["error"].append(None)
        return {
            "image_id": np.array(out["image_id"], dtype=object),
            "boxes": _ragged(out["boxes"]),
            "scores": _ragged(out["scores"]),
            "labels": _ragged(out["labels"]),
            "height": np.array(out["height"], dtype=np.int32),
            "width": np.array(out["width"], dtype=np.int32),
            "error": np.array(out["error"], dtype=object),
        }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of 1-D arrays (a list column), even when every length is equal."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out
