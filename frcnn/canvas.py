"""The canvas transform: aspect-preserving resize onto a fixed canvas, padded bottom-right.

A fixed canvas gives every image the same feature grid, so anchor targets can be computed once
and stored, and images batch without per-batch padding. ``scale`` and the original size are all
it takes to map boxes back.

Optionally (``CanvasConfig.short_side``/``max_long_side``) the paper's scale rule sets the scale,
and (``CanvasConfig.buckets``) a few canvases of different aspect ratios cut the padding: a 500x375
VOC image fills 75 % of an 800x800 canvas; the rule makes it 800x600, which fills a 608x800 bucket
to 98.7 %. Each bucket has its own feature grid, so a batch holds one bucket only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .boxes import clip_boxes
from .config import CanvasConfig


@dataclass(frozen=True)
class CanvasTransform:
    """``CanvasTransform(h, w)``: the largest scale that fits ``h x w``. ``from_config`` adds the
    paper's scale rule (short side S, long side at most L) and aspect-ratio buckets."""

    height: int
    width: int
    short_side: int = 0
    max_long_side: int = 0
    buckets: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_config(cls, cfg: CanvasConfig) -> CanvasTransform:
        return cls(cfg.height, cfg.width, cfg.short_side, cfg.max_long_side, cfg.buckets)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return self.buckets or ((self.height, self.width),)

    def _placement(self, orig_h: int, orig_w: int, size: tuple[int, int]) -> tuple[float, int, int]:
        """-> scale, resized height and width of the image on canvas ``size``."""
        h, w = size
        s = min(h / orig_h, w / orig_w)
        if self.short_side:
            s = min(s, self.short_side / min(orig_h, orig_w), self.max_long_side / max(orig_h, orig_w))
        return s, min(h, max(1, round(orig_h * s))), min(w, max(1, round(orig_w * s)))

    def canvas_for(self, orig_h: int, orig_w: int) -> tuple[int, int]:
        """The canvas (bucket) for an image: with a rule, among those holding it at the rule's
        scale, the one with the least padding; without, the least padding. Ties: the first listed."""
        def key(size: tuple[int, int]) -> tuple[float, float]:
            s, rh, rw = self._placement(orig_h, orig_w, size)
            # With a rule every bucket that holds the image gives it the rule's scale, exactly
            # (the same min): those come first. Without, only the padding counts.
            return (-s if self.short_side else 0.0), 1.0 - rh * rw / (size[0] * size[1])

        return min(self.sizes, key=key) if len(self.sizes) > 1 else self.sizes[0]

    def scale_for(self, orig_h: int, orig_w: int) -> float:
        """The scale: the rule's, or else the largest at which the image fits its canvas."""
        return self._placement(orig_h, orig_w, self.canvas_for(orig_h, orig_w))[0]

    def resized_size(self, orig_h: int, orig_w: int) -> tuple[int, int]:
        return self._placement(orig_h, orig_w, self.canvas_for(orig_h, orig_w))[1:]

    def padding_share(self, orig_h: int, orig_w: int) -> float:
        """Share of the image's canvas that is padding."""
        h, w = self.canvas_for(orig_h, orig_w)
        rh, rw = self.resized_size(orig_h, orig_w)
        return 1.0 - rh * rw / (h * w)

    def apply_image(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """PIL image (any mode) -> ``(H, W, 3)`` uint8 canvas (its bucket's size) and the scale used."""
        image = image.convert("RGB")
        h, w = self.canvas_for(image.height, image.width)
        s, rh, rw = self._placement(image.height, image.width, (h, w))
        resized = image.resize((rw, rh), Image.BILINEAR)
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        canvas[:rh, :rw] = np.asarray(resized)
        return canvas, s

    def apply_boxes(self, boxes: np.ndarray | Tensor, scale: float):
        """Original-image boxes -> canvas boxes."""
        return boxes * scale

    def invert_boxes(self, boxes: Tensor, scale: float | Tensor, orig_h: int, orig_w: int) -> Tensor:
        """Canvas boxes -> original-image boxes, clipped to the original image."""
        return clip_boxes(boxes / scale, orig_h, orig_w)


def to_tensor(canvas: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` uint8 tensor (normalisation happens in the model)."""
    return torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1)
