"""The canvas transform: aspect-preserving resize onto a fixed canvas, padded bottom-right.

A fixed canvas gives every image the same feature grid, so anchor targets can be computed once
and stored, and images batch without per-batch padding. ``scale`` and the original size are all
it takes to map boxes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .boxes import clip_boxes


@dataclass(frozen=True)
class CanvasTransform:
    height: int
    width: int

    def scale_for(self, orig_h: int, orig_w: int) -> float:
        """The largest scale at which the image fits the canvas."""
        return min(self.height / orig_h, self.width / orig_w)

    def resized_size(self, orig_h: int, orig_w: int) -> tuple[int, int]:
        s = self.scale_for(orig_h, orig_w)
        return (min(self.height, max(1, round(orig_h * s))), min(self.width, max(1, round(orig_w * s))))

    def apply_image(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """PIL image (any mode) -> ``(H, W, 3)`` uint8 canvas and the scale used."""
        image = image.convert("RGB")
        s = self.scale_for(image.height, image.width)
        rh, rw = self.resized_size(image.height, image.width)
        resized = image.resize((rw, rh), Image.BILINEAR)
        canvas = np.zeros((self.height, self.width, 3), dtype=np.uint8)
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
