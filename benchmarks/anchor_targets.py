"""Row 1: anchor targets of one image on the walkthrough's 800x800 canvas (22,500 anchors:
``ModelConfig()`` defaults, stride 16, scales 8/16/32, ratios 0.5/1/2), 2 and 20 boxes.

Baseline: ``tests/walkthrough_port.py`` (the walkthrough's plain Python loops), imported by file
path. Candidate: ``frcnn.anchors.assign_anchor_targets``. Both get the same anchors (built once,
as a precompute worker does) and the same boxes, and must give the same labels.

The headline figure is ours on one torch thread: that is how the precompute pipeline runs it (Ray
sets ``OMP_NUM_THREADS=1`` in its workers), and the baseline is single-threaded too. The default
thread count is measured as well and reported beside it.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from typing import Any

import numpy as np
import torch

from .common import REPO, calibrate, interleaved, say, timed

GOAL = 100.0
PORT_PATH = REPO / "tests" / "walkthrough_port.py"


def load_port():
    """Import ``tests/walkthrough_port.py`` by path (``tests`` is not a package)."""
    if not PORT_PATH.is_file():
        raise FileNotFoundError(f"{PORT_PATH}: the walkthrough port (row 1's baseline) is missing")
    name = "_bench_walkthrough_port"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PORT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def random_boxes(n: int, canvas: int, seed: int) -> torch.Tensor:
    """``n`` boxes of 24..480 px sides, inside the canvas, float32 xyxy (what precompute passes)."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(24, 480, size=(n, 2))
    xy = rng.uniform(0, 1, size=(n, 2)) * (canvas - wh)
    return torch.from_numpy(np.concatenate([xy, xy + wh], axis=1).astype(np.float32))


def _profile_top_ops(fn, threads: int, calls: int = 10, top: int = 6) -> list[dict[str, Any]]:
    """torch.profiler's top ops by self CPU time for ``calls`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                fn()
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows) or 1.0
        return [{"op": e.key, "shapes": str(e.input_shapes)[:80], "calls_per_image": e.count / calls,
                 "self_ms_per_image": round(e.self_cpu_time_total / calls / 1e3, 3),
                 "share": round(e.self_cpu_time_total / total, 3)} for e in rows[:top]]
    finally:
        torch.set_num_threads(saved)


def run(quick: bool) -> dict[str, Any]:
    from frcnn.anchors import assign_anchor_targets, grid_anchors
    from frcnn.boxes import BoxCoder
    from frcnn.config import ModelConfig

    port = load_port()
    cfg = ModelConfig()
    fh, fw = cfg.feature_size
    hw = (cfg.canvas.height, cfg.canvas.width)
    anchors = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
    anchor_list = anchors.tolist()  # the port's input form, built once like ours
    coder = BoxCoder(cfg.rpn.box_weights)
    default_threads = torch.get_num_threads()
    rounds = 2 if quick else 5
    per_boxes: dict[str, Any] = {}

    for n_boxes in (2, 20):
        boxes = random_boxes(n_boxes, cfg.canvas.height, seed=100 + n_boxes)
        box_list = boxes.tolist()

        def ours(b=boxes):
            return assign_anchor_targets(anchors, b, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, coder)

        def base(b=box_list):
            return port.walkthrough_anchor_targets(anchor_list, b, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou)

        got, want = ours(), base()
        agree = got.labels.tolist() == want.labels
        n_pos = int((got.labels == 1).sum())

        def ours_at(threads: int, reps: int):
            def sample() -> float:
                torch.set_num_threads(threads)
                try:
                    return timed(ours, reps)
                finally:
                    torch.set_num_threads(default_threads)
            return sample

        torch.set_num_threads(1)
        reps1 = calibrate(ours)
        torch.set_num_threads(default_threads)
        repsd = calibrate(ours)
        say(f"row 1: {n_boxes} boxes: {anchors.shape[0]} anchors, {n_pos} positive, labels agree={agree}; "
            f"{rounds} rounds x (port once, ours {reps1} calls at 1 thread, {repsd} at {default_threads})")
        samples = interleaved({"port": lambda: timed(base), "ours_1_thread": ours_at(1, reps1),
                               f"ours_{default_threads}_threads": ours_at(default_threads, repsd)}, rounds)
        best = {k: min(v) for k, v in samples.items()}
        speedup = {k: best["port"] / v for k, v in best.items() if k != "port"}
        say(f"row 1: {n_boxes} boxes: port {best['port'] * 1e3:.1f} ms, ours {best['ours_1_thread'] * 1e3:.2f} ms "
            f"at 1 thread ({speedup['ours_1_thread']:.0f}x), "
            f"{best[f'ours_{default_threads}_threads'] * 1e3:.2f} ms at {default_threads} "
            f"({speedup[f'ours_{default_threads}_threads']:.0f}x)")
        per_boxes[str(n_boxes)] = {
            "boxes": n_boxes, "positives": n_pos, "labels_agree": agree,
            "best_s": best, "median_s": {k: statistics.median(v) for k, v in samples.items()},
            "samples_s": samples, "speedup_best": speedup,
        }

    headline = {k: v["speedup_best"]["ours_1_thread"] for k, v in per_boxes.items()}
    multi = {k: v["speedup_best"][f"ours_{default_threads}_threads"] for k, v in per_boxes.items()}
    met = all(s >= GOAL for s in headline.values()) and all(v["labels_agree"] for v in per_boxes.values())
    profile = None
    if not met:
        say("row 1: goal missed: profiling assign_anchor_targets (20 boxes, 1 thread)")
        b20 = random_boxes(20, cfg.canvas.height, seed=120)
        profile = _profile_top_ops(
            lambda: assign_anchor_targets(anchors, b20, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, coder), threads=1)
    b2, b20 = per_boxes["2"], per_boxes["20"]
    return {
        "id": "1",
        "what": "anchor targets per image, 800x800 canvas, 22,500 anchors (ModelConfig() defaults), 2 and 20 boxes",
        "baseline": (f"walkthrough plain loop (tests/walkthrough_port.py): {b2['best_s']['port'] * 1e3:.1f} ms (2 boxes), "
                     f"{b20['best_s']['port'] * 1e3:.0f} ms (20 boxes)"),
        "figure": (f"{headline['2']:.0f}x (2 boxes, {b2['best_s']['ours_1_thread'] * 1e3:.2f} ms), "
                   f"{headline['20']:.0f}x (20 boxes, {b20['best_s']['ours_1_thread'] * 1e3:.2f} ms); one torch thread"),
        "goal": f">= {GOAL:.0f}x",
        "met": met,
        "value": min(headline.values()),
        "data": {"per_boxes": per_boxes, "speedup_1_thread": headline,
                 f"speedup_{default_threads}_threads": multi, "default_threads": default_threads,
                 "rounds": rounds, "statistic": "best of rounds (baseline and ours interleaved)",
                 "profile_20_boxes_1_thread": profile},
        "auto_note": (f"labels identical to the port's; at the default {default_threads} torch threads: "
                      f"{multi['2']:.0f}x / {multi['20']:.0f}x"),
    }
