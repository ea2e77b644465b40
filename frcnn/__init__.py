"""frcnn: a Faster R-CNN detector in pure PyTorch (no Ray, no MLflow, no CLI).

Coordinates are ``[x1, y1, x2, y2]`` absolute pixels; labels 1..C, 0 is background.
"""

from .config import ModelConfig, tiny_config
from .model import LOSS_KEYS, FasterRCNN, total_loss

__all__ = ["FasterRCNN", "LOSS_KEYS", "ModelConfig", "tiny_config", "total_loss"]
