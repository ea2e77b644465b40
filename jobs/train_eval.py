"""What the training loop measures across ranks: validation loss and VOC mAP@0.5, early stopping
on it, and whether DDP kept the replicas' weights identical; the collectives they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from frcnn import LOSS_KEYS, FasterRCNN, total_loss
from frcnn.precision import autocast
from frcnn.training import loss_mode
from pipelines.schema import to_model_inputs

STAT_KEYS = (*LOSS_KEYS, "loss_total")


def to_device(images: torch.Tensor, targets: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    nb = device.type == "cuda"
    out = {
        "boxes": [b.to(device, non_blocking=nb) for b in targets["boxes"]],
        "labels": [lb.to(device, non_blocking=nb) for lb in targets["labels"]],
    }
    if "anchor_labels" in targets:
        out["anchor_labels"] = targets["anchor_labels"].to(device, non_blocking=nb)
        out["anchor_deltas"] = targets["anchor_deltas"].to(device, non_blocking=nb)
    return images.to(device, non_blocking=nb), out


def all_reduce_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
        t = t / world
    return t


def gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rank_weight_diff(core: torch.nn.Module, world: int) -> float:
    """Largest difference between ranks of per-parameter fingerprints (0.0: DDP kept the replicas
    identical). BatchNorm running statistics are buffers, updated from each rank's own batch, and
    are left out: the checkpoint holds rank 0's."""
    with torch.no_grad():
        fp = torch.stack([torch.stack((p.double().sum(), p.double().pow(2).sum())) for p in core.parameters()]).cpu()
    prints = gather(fp, world)
    return float(max((a - prints[0]).abs().max() for a in prints))


def validate(core: FasterRCNN, batches, use_difficult: bool, device: torch.device, world: int,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """Validation loss and VOC mAP@0.5 (all-point) over this worker's rows, combined across ranks,
    under the training step's autocast ``amp`` (detections stay float32)."""
    from frcnn.evaluation import evaluate_voc

    cfg = core.cfg
    loss_sum = torch.zeros(len(STAT_KEYS), device=device)
    n_batches = torch.zeros(1, device=device)
    dets: dict[str, dict] = {}
    gts: dict[str, dict] = {}
    for batch in batches:
        images, targets = to_device(*to_model_inputs(batch, use_difficult), device)
        with torch.no_grad(), loss_mode(core), autocast(device, amp):
            losses = core(images, targets)
        loss_sum += torch.stack([losses[k].float() for k in LOSS_KEYS] + [total_loss(losses).float()])
        n_batches += 1
        scales = [float(s) for s in batch["scale"]]
        sizes = list(zip(batch["orig_height"].tolist(), batch["orig_width"].tolist(), strict=True))
        with autocast(device, amp):
            found = core.detect(images, scales, sizes)
        for i, d in enumerate(found):
            iid = str(batch["image_id"][i])
            dets[iid] = {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}
            gts[iid] = {
                "boxes": np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4) / scales[i],
                "labels": np.asarray(batch["labels"][i], dtype=np.int64),
                "difficult": np.asarray(batch["difficult"][i], dtype=bool),
            }
    totals = all_reduce_mean(torch.cat([loss_sum, n_batches]), world)
    mean = (totals[:-1] / totals[-1].clamp(min=1e-9)).tolist()
    out = {f"val_{k}": v for k, v in zip(STAT_KEYS, mean, strict=True)}
    all_dets, all_gts = {}, {}
    for part_d, part_g in gather((dets, gts), world):
        all_dets.update(part_d)
        all_gts.update(part_g)
    names = list(cfg.class_names) or [f"class{i}" for i in range(1, cfg.num_classes + 1)]
    out["val_map50"] = float(evaluate_voc(all_dets, all_gts, names).map)
    return out


@dataclass
class EarlyStop:
    """``train.early_stop_patience``: validations in a row without a gain in val mAP@0.5 before
    the run stops (0: never). Its state travels in every checkpoint's metrics, so a restarted or
    resumed group goes on counting."""

    patience: int
    best: float = float("-inf")
    best_epoch: int = -1
    stale: int = 0

    @classmethod
    def resume(cls, patience: int, metrics: dict[str, Any] | None) -> EarlyStop:
        m = metrics or {}
        if "early_stop_best" not in m:
            return cls(patience)
        return cls(patience, float(m["early_stop_best"]), int(m["early_stop_best_epoch"]), int(m["early_stop_stale"]))

    def update(self, map50: float, epoch: int) -> bool:
        """Count one validation; True when the run should stop here."""
        if map50 > self.best:
            self.best, self.best_epoch, self.stale = map50, epoch, 0
        else:
            self.stale += 1
        return 0 < self.patience <= self.stale

    def metrics(self) -> dict[str, float]:
        return {"early_stop_best": self.best, "early_stop_best_epoch": self.best_epoch, "early_stop_stale": self.stale}

    def reason(self) -> str:
        return (f"early stop: val mAP@0.5 did not improve for {self.stale} validation(s) "
                f"(best {self.best:.4f} at epoch {self.best_epoch + 1})")
