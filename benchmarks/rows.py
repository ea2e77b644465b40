"""The benchmark's rows, each registered once: its ids, what it measures, its goal and the function
that measures it. ``benchmarks.run`` runs the registered rows in order; a new row is one
``@row(...)`` function here (its measuring module is imported only when it runs).

Rows that one measurement produces together (training and inference images/s; precompute speed
and memory; data wait and scaling) register as one entry with several ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .workspace import Workspace


@dataclasses.dataclass
class Context:
    """What the rows share in one run: sizes, the device, the generated data, and results one row
    hands to the next (precompute's training shards, row 8's checkpoint)."""

    quick: bool
    device: str
    work: Path
    workspace: Workspace
    train_images: int
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    ids: tuple[str, ...]
    goals: tuple[str, ...]
    description: str
    measure: Callable[[Context], dict[str, dict[str, Any]]]  # -> {row id: row}
    images: Callable[[bool], int] = lambda quick: 0  # generated images it needs


REGISTRY: list[Row] = []


def row(name: str, ids: tuple[str, ...], goals: tuple[str, ...], description: str,
        images: Callable[[bool], int] = lambda quick: 0):
    """Register the decorated ``measure(ctx) -> {id: row}`` as the row(s) ``ids``."""
    def register(measure):
        REGISTRY.append(Row(name, ids, goals, description, measure, images))
        return measure
    return register


def all_ids() -> list[str]:
    return [i for r in REGISTRY for i in r.ids]


# Order: the single-process rows first (no Ray daemons beside them), then Ray.

@row("anchor_targets", ("1",), (">= 100x",), "anchor targets per image against the walkthrough's plain loops")
def _anchor_targets(ctx: Context) -> dict:
    from . import anchor_targets

    return {"1": anchor_targets.run(ctx.quick)}


@row("coco_ingest", ("10",), ("<= 1.5x",),
     "COCO instances ingest (train2017-sized file) against json.load: CPU time and peak memory")
def _coco_ingest(ctx: Context) -> dict:
    from . import coco_ingest_bench

    return {"10": coco_ingest_bench.run(ctx.quick)}


@row("detector", ("4", "5", "4g", "5g"), (">= 1.1x", ">= 1.0x", ">= 1.1x", ">= 1.0x"),
     "training and inference images/s against torchvision's FasterRCNN (CPU; GPU with --device cuda)")
def _detector(ctx: Context) -> dict:
    import torch

    from . import detector

    # Headline at one torch thread: what a training worker runs with, and the only setting not
    # swamped by OpenMP stalls when other processes share the cores. Then the default threads.
    res = detector.run(ctx.quick, "cpu", threads=1)
    out = {"4": res["train"], "5": res["infer"]}
    default_threads = torch.get_num_threads()
    if default_threads != 1:
        alt = detector.run(ctx.quick, "cpu", threads=default_threads, rounds=1 if ctx.quick else 3)
        for key, rid in (("train", "4"), ("infer", "5")):
            out[rid]["data"][f"at_{default_threads}_threads"] = alt[key]["data"]
            out[rid]["auto_note"] += f"; at {default_threads} torch threads: {alt[key]['figure']}"
    if ctx.device == "cuda" and torch.cuda.is_available():
        gpu = detector.run(ctx.quick, "cuda", amp=True)
        out["4g"], out["5g"] = gpu["train"], gpu["infer"]
    else:
        reason = "not measured (run with --device cuda)" if torch.cuda.is_available() else "not measured (no GPU)"
        out.update(_gpu_rows(reason))
    return out


def _gpu_rows(reason: str) -> dict:
    return {"4g": {"id": "4g", "what": "training images/s on the GPU (bf16 autocast) vs torchvision",
                   "baseline": "-", "figure": reason, "goal": ">= 1.1x", "met": None, "value": None},
            "5g": {"id": "5g", "what": "inference images/s on the GPU (bf16 autocast) vs torchvision",
                   "baseline": "-", "figure": reason, "goal": ">= 1.0x", "met": None, "value": None}}


@row("precompute", ("2", "3"), (">= 80% of the floor", "<= 1.2x"),
     "precompute throughput against the decode+resize+encode floor; its peak memory at N and 10N",
     images=lambda quick: (24 if quick else 200) * 10)
def _precompute(ctx: Context) -> dict:
    from . import precompute_bench

    res = precompute_bench.run(ctx.quick, ctx.workspace, ctx.train_images)
    ctx.shared["train_shards"] = res["train_shards"]
    return {"2": res["throughput"], "3": res["memory"]}


@row("training", ("6", "7"), ("<= 5%", "none (ratio stated)"),
     "data wait during training; one to two training workers", images=lambda quick: 32 if quick else 64)
def _training(ctx: Context) -> dict:
    from . import training_bench

    shards = ctx.shared.get("train_shards") or ctx.workspace.train_shards(ctx.train_images)
    res = training_bench.run(ctx.quick, shards, ctx.work / "train", ctx.train_images)
    return {"6": res["wait"], "7": res["scaling"]}


@row("jobs_train", ("8",), (">= 90%",), "`frcnn-jobs train` against the bare training loop",
     images=lambda quick: 64 if quick else 256)
def _jobs_train(ctx: Context) -> dict:
    from . import jobs_bench

    res = jobs_bench.run_train(ctx.quick, ctx.workspace, ctx.work / "row8")
    ctx.shared["checkpoint"] = res["checkpoint"]
    return {"8": res["row"]}


@row("jobs_infer", ("9",), (">= 70%",), "`frcnn-jobs infer` against the model-only detect()",
     images=lambda quick: 64 if quick else 600)
def _jobs_infer(ctx: Context) -> dict:
    from . import jobs_bench

    return {"9": jobs_bench.run_infer(ctx.quick, ctx.workspace, ctx.work / "row9", ctx.shared.get("checkpoint"))}
