"""One way to load a trained detector and run it on encoded images (JPEG/PNG bytes).

    detector = Detector.from_checkpoint("checkpoint.pt", "cpu")     # or the file's bytes; or "cuda"
    results = detector.predict([jpeg_bytes, png_bytes, b"garbage"])   # one Detections per input
    results[0].boxes   # (N, 4) float32, xyxy in the ORIGINAL image's pixels

Used by the registered MLflow pyfunc (``jobs/pyfunc_model.py``) and by the Ray Data predictor
that ``infer`` and ``evaluate`` share (``pipelines/predict.py``): decode (``frcnn.images``: upright,
8-bit RGB, bombs refused) -> the model's canvas transform -> ``FasterRCNN.detect`` in batches ->
boxes mapped back to each image. An input that does not decode gives a result with ``error`` set,
never an exception: one bad file must not cost the batch.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from .canvas import to_tensor
from .images import decode_error_reason, decode_image
from .model import FasterRCNN
from .precision import autocast, autocast_dtype
from .training import load_checkpoint, model_from_checkpoint

__all__ = ["Detections", "Detector", "load_model"]


def load_model(checkpoint: str | bytes | BinaryIO, device: str | torch.device = "cpu") -> FasterRCNN:
    """A checkpoint (path, bytes or file object; ``weights_only=True``) -> the model in eval mode."""
    src = io.BytesIO(checkpoint) if isinstance(checkpoint, (bytes, bytearray, memoryview)) else checkpoint
    return model_from_checkpoint(load_checkpoint(src)).to(device).eval()


@dataclass
class Detections:
    """One image's detections: ``boxes`` (N, 4) float32 original pixels, ``scores`` (N,) float32,
    ``labels`` (N,) int32 (1..C), ``height``/``width`` of the original image (-1 when it did not
    decode), ``error`` (None, or why the image could not be decoded)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    height: int = -1
    width: int = -1
    error: str | None = None

    @classmethod
    def failed(cls, reason: str) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), error=reason)


class Detector:
    """A model plus everything between encoded bytes and its detections.

    ``threads``: torch's intra-op threads, also the threads decoding a batch (PIL releases the GIL
    while decoding and resizing, so a batch decodes in parallel). ``score_threshold``: drop
    detections below it (the model's own ``roi.score_thresh`` always applies). ``amp``: the
    model's autocast as ``train.amp`` names it (``auto``: bfloat16 on CUDA, float32 on CPU); boxes
    and scores stay float32 either way. The device is the model's: the caller chooses it.

    ``predict`` may be called from several threads at once: the model runs one batch at a time
    (a lock), while the other callers decode theirs. Two callers on a one-thread detector keep
    the model busy while the next batch decodes on another core (``pipelines/predict.py``).
    """

    def __init__(self, model: FasterRCNN, *, score_threshold: float | None = None, threads: int | None = None,
                 amp: str = "auto") -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.amp = autocast_dtype(amp, self.device)
        self.score_threshold = score_threshold
        self.class_names = tuple(model.cfg.class_names)
        # The dataset's id of label k at [k - 1] (COCO); a model trained without ids answers its labels.
        self.category_ids = tuple(model.cfg.category_ids) or tuple(range(1, model.cfg.num_classes + 1))
        workers = max(1, int(threads or torch.get_num_threads()))
        # One thread: decode in the caller's thread (concurrent callers then decode in parallel).
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self._model_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | bytes | BinaryIO, device: str | torch.device = "cpu",
                        **kwargs) -> Detector:
        """The detector of a checkpoint on ``device`` (never chosen for the caller: a CPU
        predictor on a GPU node stays on the CPU)."""
        return cls(load_model(checkpoint, device), **kwargs)

    def category_id(self, label: int) -> int:
        """The dataset's category id of label ``k`` (1..C): COCO's own id for a model trained on
        COCO data, the label itself otherwise."""
        ids = self.category_ids
        return int(ids[label - 1]) if 0 < label <= len(ids) else int(label)

    def class_name(self, label: int) -> str:
        """The name of label ``k`` (1..C); the number itself for a model saved without names."""
        names = self.class_names
        return names[label - 1] if 0 < label <= len(names) else str(label)

    def _prepare(self, data: bytes) -> tuple[torch.Tensor, float, tuple[int, int]] | str:
        try:
            image = decode_image(data)
        except Exception as exc:  # noqa: BLE001 - any decoder error is this input's reported reason
            return decode_error_reason(exc, "unreadable image")
        canvas, scale = self.model.canvas.apply_image(image)
        return to_tensor(canvas), scale, (image.height, image.width)

    def predict(self, images: Sequence[bytes]) -> list[Detections]:
        """Detections for each encoded image, in order; the decodable ones go through the model at
        once, or once per canvas bucket (``canvas.buckets``: ``apply_image`` picks each image's)."""
        prepared = list(self._pool.map(self._prepare, images)) if self._pool and len(images) > 1 else [
            self._prepare(d) for d in images]
        # One model call per canvas (bucket): a batch has one image size and one anchor grid.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            if not isinstance(p, str):
                groups.setdefault(tuple(p[0].shape), []).append(i)
        found: dict[int, dict] = {}
        for idx in groups.values():
            batch = torch.stack([prepared[i][0] for i in idx])
            with self._model_lock, autocast(self.device, self.amp):
                dets = self.model.detect(batch.to(self.device), [prepared[i][1] for i in idx],
                                         [prepared[i][2] for i in idx])
            found.update(zip(idx, dets, strict=True))
        out = []
        for i, p in enumerate(prepared):
            if isinstance(p, str):
                out.append(Detections.failed(p))
                continue
            d = found[i]
            scores = d["scores"]
            keep = scores >= self.score_threshold if self.score_threshold is not None else slice(None)
            h, w = p[2]
            out.append(Detections(d["boxes"][keep].float().cpu().numpy().astype(np.float32, copy=False),
                                  scores[keep].float().cpu().numpy().astype(np.float32, copy=False),
                                  d["labels"][keep].cpu().numpy().astype(np.int32), h, w))
        return out
