"""Training pieces that need no Ray: the training config, optimiser and schedule, the exact
horizontal flip of a batch with its stored targets, checkpoint (de)serialisation.

The learning rate scales with the effective batch (workers x per-worker batch):
``lr = base_lr * scale(effective_batch / lr_reference_batch)`` with scale ``linear`` (Goyal et
al. 2017: the default), ``sqrt`` or ``none``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .anchors import hflip_anchor_targets
from .boxes import hflip_boxes
from .config import ModelConfig, _build


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 2  # per worker
    base_lr: float = 0.02
    lr_reference_batch: int = 16  # base_lr is the rate for this effective batch
    lr_scaling: str = "linear"  # linear | sqrt | none
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    warmup_factor: float = 0.001
    schedule: str = "step"  # step | cosine
    milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of the total steps (step schedule)
    gamma: float = 0.1
    grad_clip_norm: float = 10.0  # 0 disables
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    hflip_prob: float = 0.5
    log_every: int = 10  # steps between MLflow metric writes
    checkpoint_every: int = 1  # epochs between checkpoints
    val_every: int = 1  # epochs between validations (the last epoch always validates)
    keep_checkpoints: int = 2  # best k by the validation metric (latest k without validation)
    max_failures: int = 2  # worker-group restarts before the job fails
    # Validations in a row without a gain in val mAP@0.5 before the run stops (0: never stops early).
    early_stop_patience: int = 0
    seed: int = 0
    prefetch_batches: int = 2

    def lr_for(self, effective_batch: int) -> float:
        ratio = effective_batch / self.lr_reference_batch
        if self.lr_scaling == "linear":
            return self.base_lr * ratio
        if self.lr_scaling == "sqrt":
            return self.base_lr * math.sqrt(ratio)
        if self.lr_scaling == "none":
            return self.base_lr
        raise ValueError(f"train.lr_scaling {self.lr_scaling!r}: linear, sqrt or none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, data, "train")


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base rate at ``step``: linear warm-up, then step or cosine decay."""
    if step < cfg.warmup_steps:
        alpha = step / max(cfg.warmup_steps, 1)
        warm = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warm = 1.0
    if cfg.schedule == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        passed = sum(step >= int(m * total_steps) for m in cfg.milestones)
        return warm * cfg.gamma**passed
    raise ValueError(f"train.schedule {cfg.schedule!r}: step or cosine")


def hflip_batch(images: Tensor, targets: dict, flip: Tensor, cfg: ModelConfig) -> tuple[Tensor, dict]:
    """Flip the images where ``flip`` (B,) is True, with their boxes and stored anchor targets,
    exactly: no anchor target is recomputed (see ``frcnn.anchors.hflip_anchor_targets``). The batch
    is one canvas (bucket): its width and anchor grid are the images'."""
    if not bool(flip.any()):
        return images, targets
    fh, fw = cfg.feature_size_for(tuple(images.shape[-2:]))
    width = images.shape[-1]
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    out = dict(targets)
    if "anchor_labels" in targets:
        fl, fd = hflip_anchor_targets(targets["anchor_labels"], targets["anchor_deltas"], (fh, fw),
                                      cfg.anchors.num_anchors)
        out["anchor_labels"] = torch.where(flip[:, None], fl, targets["anchor_labels"])
        out["anchor_deltas"] = torch.where(flip[:, None, None], fd, targets["anchor_deltas"])
    out["boxes"] = [hflip_boxes(b, width) if f else b for b, f in zip(targets["boxes"], flip.tolist(), strict=True)]
    return images, out


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "bf16"):
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"train.amp {amp!r}: auto, bf16, fp16 or off")


@contextlib.contextmanager
def loss_mode(model: nn.Module) -> Iterator[None]:
    """Compute losses (the training path) with BatchNorm and dropout in eval behaviour, so that a
    validation loss neither updates running statistics nor drops units."""
    was = model.training
    model.train()
    norm = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))]
    for m in norm:
        m.eval()
    try:
        yield
    finally:
        model.train(was)


def checkpoint_state(model: nn.Module, optimizer, epoch: int, step: int, model_cfg: ModelConfig,
                     train_cfg: TrainConfig, metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A checkpoint made of tensors and plain values only: loadable with ``weights_only=True``."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "step": step,
        "model_config": model_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "metrics": dict(metrics or {}),
        "format": "frcnn-checkpoint/1",
    }


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "frcnn-checkpoint/1":
        raise ValueError(f"{path}: not an frcnn checkpoint")
    return state


def model_from_checkpoint(state: Mapping[str, Any]):
    from .model import FasterRCNN

    cfg = ModelConfig.from_dict(state["model_config"])
    model = FasterRCNN(cfg)
    model.load_state_dict(state["model"])
    return model
