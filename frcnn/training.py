"""Training pieces that need no Ray: optimiser and schedule, the exact horizontal flip of a batch
with its stored targets, checkpoint (de)serialisation. The training config is
``frcnn.config.TrainConfig``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .anchors import hflip_anchor_targets
from .boxes import hflip_boxes
from .config import ModelConfig, TrainConfig
from .errors import ConfigError, DatasetError


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
    raise ConfigError(f"train.schedule {cfg.schedule!r}: step or cosine")


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
        raise DatasetError(f"{path}: not an frcnn checkpoint")
    return state


# DistributedDataParallel's options for the detector. Buffers are synced from rank 0 once, when DDP
# wraps the model (the frozen BatchNorm statistics only rank 0 read from the backbone's weights),
# not before every forward: ``forward_sync_buffers=False``. (``broadcast_buffers=False`` would skip
# that first sync too, and leave the other ranks' frozen statistics at their initial values.)
# Gradients live in the all-reduce buckets instead of a copy: ``gradient_as_bucket_view``.
DDP_OPTIONS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}


def training_model(cfg: ModelConfig, state: Mapping[str, Any] | None, rank: int):
    """The model a training rank starts from. Resuming (``state``): the checkpoint's weights, and
    the backbone's weights are not read. A fresh start: rank 0 reads the backbone's weights
    (``backbone.weights``) once; the other ranks build the same architecture without them and
    receive rank 0's parameters and buffers when DDP wraps the model."""
    from .model import FasterRCNN

    model = FasterRCNN(cfg, load_backbone_weights=rank == 0 and state is None)
    if state is not None:
        model.load_state_dict(state["model"])
    return model


def model_from_checkpoint(state: Mapping[str, Any]):
    """The model a checkpoint holds, from the checkpoint alone: its config's backbone weights
    (``imagenet`` or a path) are neither downloaded nor read, the state dict has every weight."""
    from .model import FasterRCNN

    cfg = ModelConfig.from_dict(state["model_config"])
    model = FasterRCNN(cfg, load_backbone_weights=False)
    model.load_state_dict(state["model"])
    return model
