"""`make gpu-check`: the VOC recipe's detector on one GPU, in under 10 minutes, one printed table.

    python -m benchmarks.gpu_check            # CUDA: the recipe (VGG16, its 608x1008 bucket, bf16)
    python -m benchmarks.gpu_check --tiny     # CPU, a few seconds' worth: what CI runs so this cannot rot

What it checks, on generated images (pipelines.synth, VOC's image sizes, the recipe's scale rule):
1. training: ``--steps`` SGD steps in bf16 and the same steps in float32 (TF32 off) from the same
   initial weights, the same batches and the same sampling seeds. The losses must fall (mean of the
   last fifth below the first fifth, total and each classification loss) and the two loss curves
   must agree: in every fifth of the run, each precision's mean total loss within ``CURVE_RTOL``
   of the other's. The runs start identical and drift apart as SGD amplifies rounding
   differences (chaos, not bias), so the comparison is of windowed means, not of steps.
2. speed: training and inference images/s of ours (bf16) against torchvision's ``FasterRCNN`` on
   the same VGG16 features, anchors, proposal counts, RoI sampling and a 4096-wide two-layer head
   (benchmark rows 4g/5g), interleaved rounds, best of rounds; ours trains from precomputed anchor
   targets, as the precompute job stores them.
3. peak GPU memory of a training step, each model.

Weights are random (no download: the device machines have no network). Exit status 1 when a check
fails. ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import interleaved

# Windowed mean total losses of bf16 and float32 runs, measured on CPU: 0.9 % apart at most for
# VGG16 on a 128-px canvas (12 steps), 8.4 % for the tiny detector (12 steps: 2-step windows, so
# noisier). 15 % leaves room for the chaotic drift of two SGD trajectories over hundreds of steps
# while still catching a systematic bias (a loss that stops falling in one precision, or a
# diverging run). Not yet measured on a GPU.
CURVE_RTOL = 0.15
VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (281, 500), (500, 333))  # (h, w)


@dataclasses.dataclass
class Plan:
    device: torch.device
    tiny: bool
    steps: int
    batch: int
    n_images: int
    rounds: int
    timed_steps: int


def _say(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[gpu-check {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def model_config(tiny: bool):
    """The recipe's model (frcnn/configs/vgg16_voc.yaml) on the five generated classes, random
    weights. Tiny: the tiny CPU detector (frcnn.config.tiny_config) on a 128-px canvas with the
    scale rule (short side 96, long side at most 128): VGG16 on CPU takes seconds per step, and
    this mode exists to keep the script's every path running in CI, not to measure VGG16."""
    from frcnn.config import load_config, tiny_config
    from pipelines.synth import SYNTH_CLASSES

    if tiny:
        cfg = tiny_config(len(SYNTH_CLASSES), tuple(SYNTH_CLASSES), canvas=128)
        return cfg.replace(canvas=dataclasses.replace(cfg.canvas, short_side=96, max_long_side=128))
    cfg, _ = load_config("vgg16_voc")
    return cfg.replace(num_classes=len(SYNTH_CLASSES), class_names=tuple(SYNTH_CLASSES),
                       backbone=dataclasses.replace(cfg.backbone, weights=None))


def generated_data(cfg, n: int, seed: int = 0):
    """``n`` generated images with objects, at VOC's sizes, through the config's canvas transform,
    with their anchor targets (assigned here, outside any clock, as the precompute job does)."""
    from frcnn.anchors import assign_anchor_targets, grid_anchors
    from frcnn.boxes import BoxCoder
    from frcnn.canvas import CanvasTransform
    from pipelines.synth import SYNTH_CLASSES, render_image

    transform = CanvasTransform.from_config(cfg.canvas)
    # One canvas: the config's height x width (with buckets, the recipe's landscape one; images
    # that go on another bucket are skipped, as a training batch holds one bucket).
    hw = (cfg.canvas.height, cfg.canvas.width)
    fh, fw = cfg.feature_size_for(hw)
    anchors = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
    coder = BoxCoder(cfg.rpn.box_weights)
    shrink = 1.0 if min(hw) >= 600 else min(hw) / 1000  # tiny: smaller originals, same aspect ratios
    rng = np.random.default_rng(seed)
    images, boxes, labels, a_labels, a_deltas = [], [], [], [], []
    other = 0  # sizes passed over: on another bucket
    while len(images) < n:
        h, w = VOC_SIZES[(len(images) + other) % len(VOC_SIZES)]
        if transform.canvas_for(max(32, round(h * shrink)), max(32, round(w * shrink))) != hw:
            other += 1
            continue
        image, objects = render_image(rng, max(32, round(w * shrink)), max(32, round(h * shrink)))
        if not objects:
            continue
        canvas, scale = transform.apply_image(image)
        b = torch.tensor([o["box"] for o in objects], dtype=torch.float32) * scale
        images.append(torch.from_numpy(canvas).permute(2, 0, 1).contiguous())
        boxes.append(b)
        labels.append(torch.tensor([SYNTH_CLASSES.index(o["name"]) + 1 for o in objects]))
        t = assign_anchor_targets(anchors, b, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, coder)
        a_labels.append(t.labels)
        a_deltas.append(t.deltas)
    return torch.stack(images), boxes, labels, torch.stack(a_labels), torch.stack(a_deltas)


def batches(data, batch: int, steps: int, device: torch.device):
    images, boxes, labels, a_labels, a_deltas = data
    n = images.shape[0]
    for step in range(steps):
        idx = [(step * batch + i) % n for i in range(batch)]
        yield step, images[idx].to(device), {
            "boxes": [boxes[i].to(device) for i in idx], "labels": [labels[i].to(device) for i in idx],
            "anchor_labels": a_labels[idx].to(device), "anchor_deltas": a_deltas[idx].to(device)}


def train_curve(cfg, data, plan: Plan, amp: torch.dtype | None, init: dict) -> list[dict[str, float]]:
    """``plan.steps`` steps from ``init``; every step's four losses. The recipe's optimiser
    (frcnn.training.build_optimizer, momentum, weight decay, warm-up), lr per image x batch."""
    from frcnn import LOSS_KEYS, FasterRCNN, total_loss
    from frcnn.config import load_config
    from frcnn.training import TrainConfig, build_optimizer, lr_factor

    _, train = load_config("vgg16_voc")
    tcfg = TrainConfig.from_dict({**train, "warmup_steps": max(1, plan.steps // 10)})
    base_lr = tcfg.lr_for(plan.batch) * (10 if plan.tiny else 1)  # tiny: overfits a few images in few steps
    model = FasterRCNN(cfg).to(plan.device)
    model.load_state_dict(init)
    model.train()
    opt = build_optimizer(model, tcfg, base_lr)
    curve = []
    for step, images, targets in batches(data, plan.batch, plan.steps, plan.device):
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(step, plan.steps, tcfg)
        torch.manual_seed(1000 + step)  # the same anchor and RoI samples in both precisions
        with torch.autocast(plan.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            losses = model(images, targets)
        loss = total_loss(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip_norm)
        opt.step()
        curve.append({k: float(losses[k].detach()) for k in LOSS_KEYS} | {"total": float(loss.detach())})
        if not math.isfinite(curve[-1]["total"]):
            break
    return curve


def windows(curve: list[dict[str, float]], key: str, n: int = 5) -> list[float]:
    n = max(1, min(n, len(curve)))
    size = len(curve) // n
    return [float(np.mean([c[key] for c in curve[i * size:(i + 1) * size]])) for i in range(n)]


def torchvision_model(cfg):
    """torchvision's FasterRCNN on the same backbone body (VGG16: conv1_1..conv5_3), anchors,
    proposal counts, samples and thresholds, with a TwoMLPHead as wide as ours (4096 for VGG16);
    canvases are not resized (min_size = max_size = the canvas)."""
    from benchmarks.detector import torchvision_faster_rcnn
    from frcnn.backbones import build_backbone

    bb = build_backbone(cfg.backbone, cfg.roi, cfg.anchors.stride)
    return torchvision_faster_rcnn(cfg, bb.body, bb.out_channels, bb.head_out, cfg.roi.sampling_ratio)


def speed(cfg, data, plan: Plan) -> dict[str, Any]:
    """Train and infer images/s, ours against torchvision's, bf16; peak memory of a train step."""
    from frcnn import FasterRCNN, total_loss

    dev, cuda = plan.device, plan.device.type == "cuda"
    torch.manual_seed(0)
    models = {"ours": FasterRCNN(cfg).to(dev), "torchvision": torchvision_model(cfg).to(dev)}
    _, images, targets = next(batches(data, plan.batch, 1, dev))
    inputs = {"ours": (images, targets),
              "torchvision": ([im.float() / 255 for im in images],
                              [{"boxes": b, "labels": lab} for b, lab in zip(targets["boxes"], targets["labels"],
                                                                               strict=True)])}
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            for k, m in models.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def train_step(name: str) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            losses = models[name](*inputs[name])
        opts[name].zero_grad(set_to_none=True)
        (total_loss(losses) if name == "ours" else sum(losses.values())).backward()
        opts[name].step()

    def infer_step(name: str) -> None:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            models[name](inputs[name][0])

    def clock(fn, name):
        def sample() -> float:
            sync()
            t = time.perf_counter()
            for _ in range(plan.timed_steps):
                fn(name)
            sync()
            return (time.perf_counter() - t) / plan.timed_steps
        return sample

    out: dict[str, Any] = {"peak_mem_gib": {}}
    for name, m in models.items():
        m.train()
        for _ in range(2):  # warm-up: cuDNN autotune, allocator
            train_step(name)
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(dev)
            train_step(name)
            sync()
            out["peak_mem_gib"][name] = torch.cuda.max_memory_allocated(dev) / 2**30
    train = interleaved({k: clock(train_step, k) for k in models}, plan.rounds)
    for m in models.values():
        m.eval()
    for name in models:
        infer_step(name)
    infer = interleaved({k: clock(infer_step, k) for k in models}, plan.rounds)
    out["train_ips"] = {k: plan.batch / min(v) for k, v in train.items()}
    out["infer_ips"] = {k: plan.batch / min(v) for k, v in infer.items()}
    out["samples_s"] = {"train": train, "infer": infer}
    return out


def run(plan: Plan) -> tuple[dict[str, Any], list[tuple[str, str, str, bool | None]]]:
    cfg = model_config(plan.tiny)
    _say(f"{'tiny (CPU CI) mode' if plan.tiny else 'full mode'} on {plan.device}: {cfg.backbone.name}, canvas "
         f"{cfg.canvas.height}x{cfg.canvas.width} (short side {cfg.canvas.short_side}, long <= "
         f"{cfg.canvas.max_long_side}), batch {plan.batch}, {plan.steps} steps per precision")
    data = generated_data(cfg, plan.n_images)
    from frcnn import FasterRCNN

    torch.manual_seed(0)
    init = {k: v.clone() for k, v in FasterRCNN(cfg).state_dict().items()}
    if plan.device.type == "cuda":  # float32 means float32: no TF32 in the reference run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    curves, secs = {}, {}
    for name, amp in (("bf16", torch.bfloat16), ("fp32", None)):
        t = time.perf_counter()
        curves[name] = train_curve(cfg, data, plan, amp, init)
        secs[name] = time.perf_counter() - t
        w = windows(curves[name], "total")
        _say(f"{name}: {len(curves[name])} steps in {secs[name]:.1f} s; total loss by fifths "
             + " ".join(f"{v:.3f}" for v in w))
    sp = speed(cfg, data, plan)
    _say("speed: train " + ", ".join(f"{k} {v:.1f}" for k, v in sp["train_ips"].items())
         + " img/s; infer " + ", ".join(f"{k} {v:.1f}" for k, v in sp["infer_ips"].items()) + " img/s")

    rows: list[tuple[str, str, str, bool | None]] = []
    for name, curve in curves.items():
        finite = len(curve) == plan.steps and all(math.isfinite(c["total"]) for c in curve)
        falls = {k: windows(curve, k)[-1] < windows(curve, k)[0] for k in ("total", "loss_rpn_cls", "loss_roi_cls")}
        first, last = windows(curve, "total")[0], windows(curve, "total")[-1]
        rows.append((f"losses fall, {name}", f"{len(curve)} steps, {secs[name]:.0f} s",
                     f"total {first:.3f} -> {last:.3f}; rpn_cls, roi_cls fall: "
                     f"{falls['loss_rpn_cls']}, {falls['loss_roi_cls']}", finite and all(falls.values())))
    wb, wf = windows(curves["bf16"], "total"), windows(curves["fp32"], "total")
    worst = max(abs(a - b) / b for a, b in zip(wb, wf, strict=True))
    rows.append(("bf16 vs fp32 loss curves", "mean total loss per fifth",
                 f"max rel. diff {worst:.3f} (tolerance {CURVE_RTOL})", worst <= CURVE_RTOL))
    # Step 1, same weights, batch and anchor sample: the RPN's losses (the RoI head's depend on
    # which proposals survive NMS, and near-tied initial scores reorder under any rounding; the
    # head itself is compared on fixed proposals in tests/test_precision.py).
    first_step = {k: abs(curves["bf16"][0][k] - curves["fp32"][0][k]) / curves["fp32"][0][k]
                  for k in ("loss_rpn_cls", "loss_rpn_loc")}
    rows.append(("bf16 vs fp32, step 1, RPN losses", "same weights, batch and anchor sample",
                 "max rel. diff " + f"{max(first_step.values()):.2e} (tolerance 2^-6 = 1.6e-02)",
                 max(first_step.values()) <= 2.0**-6))
    for kind in ("train", "infer"):
        ips = sp[f"{kind}_ips"]
        rows.append((f"{kind} images/s, bf16", f"torchvision {ips['torchvision']:.1f}",
                     f"ours {ips['ours']:.1f} ({ips['ours'] / ips['torchvision']:.2f}x)", None))
    if sp["peak_mem_gib"]:
        m = sp["peak_mem_gib"]
        rows.append(("peak GPU memory, train step", f"torchvision {m['torchvision']:.2f} GiB",
                     f"ours {m['ours']:.2f} GiB", None))
    result = {"plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()}, "curves": curves,
              "speed": sp, "seconds": secs, "device_name": torch.cuda.get_device_name(plan.device)
              if plan.device.type == "cuda" else "cpu"}
    return result, rows


def print_table(rows) -> None:
    head = ("check", "baseline / setting", "figure", "ok")
    cells = [head] + [(a, b, c, "" if ok is None else ("yes" if ok else "NO")) for a, b, c, ok in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    for i, r in enumerate(cells):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU CI size (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per precision (300 full, 12 tiny)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (4 full, 2 tiny)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    if tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = Plan(device=torch.device("cuda" if cuda and not args.tiny else "cpu"), tiny=tiny,
                steps=args.steps or (12 if tiny else 300), batch=args.batch or (2 if tiny else 4),
                n_images=2 if tiny else 64, rounds=2 if tiny else 5, timed_steps=1 if tiny else 10)
    result, rows = run(plan)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
