"""`make gpu-check`: the VOC recipe's detector on one GPU, in under 10 minutes, one printed table.

    python -m benchmarks.gpu_check            # CUDA: the recipe (VGG16, its 608x1008 bucket, bf16)
    python -m benchmarks.gpu_check --tiny     # CPU, a few seconds' worth: what CI runs so this cannot rot
    python -m benchmarks.gpu_check --gpus 8   # also the real `frcnn-jobs train` on 1 and on 8 GPUs

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
   targets, as the precompute job stores them. Inputs are channels-last uint8 canvases, as
   ``pipelines.schema.to_model_inputs`` makes them; ours infers as ``frcnn.inference.Detector``
   runs it (``detect`` under ``Detector``'s autocast: bf16 on CUDA); ``cudnn.benchmark`` is on,
   as in training; models are built and warmed up before any clock starts.
3. peak GPU memory of a training step, each model measured alone on the device.
4. with ``--gpus N``: the real ``frcnn-jobs train`` (precompute, then DDP training through Ray
   Train) on the recipe with random weights and ``--images`` generated images, once on 1 GPU and
   once on N; the images/s per GPU that the run logs, and the scaling efficiency
   (N-GPU images/s divided by N times the 1-GPU images/s).

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

# Windowed mean total losses of bf16 and float32 runs: 15 % leaves room for the chaotic drift of
# two SGD trajectories over hundreds of steps while still catching a systematic bias (a loss that
# stops falling in one precision, or a diverging run). It is set from CPU runs of VGG16 and the
# tiny detector; the first GPU run checks it.
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
        images.append(torch.from_numpy(canvas))  # (H, W, 3): stacked and permuted below
        boxes.append(b)
        labels.append(torch.tensor([SYNTH_CLASSES.index(o["name"]) + 1 for o in objects]))
        t = assign_anchor_targets(anchors, b, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, coder)
        a_labels.append(t.labels)
        a_deltas.append(t.deltas)
    # (N, 3, H, W) with channels-last strides: what pipelines.schema.to_model_inputs gives training
    return torch.stack(images).permute(0, 3, 1, 2), boxes, labels, torch.stack(a_labels), torch.stack(a_deltas)


def batches(data, batch: int, steps: int, device: torch.device):
    images, boxes, labels, a_labels, a_deltas = data
    n = images.shape[0]
    for step in range(steps):
        idx = [(step * batch + i) % n for i in range(batch)]
        yield step, images[idx].contiguous(memory_format=torch.channels_last).to(device), {
            "boxes": [boxes[i].to(device) for i in idx], "labels": [labels[i].to(device) for i in idx],
            "anchor_labels": a_labels[idx].to(device), "anchor_deltas": a_deltas[idx].to(device)}


def train_curve(cfg, data, plan: Plan, amp: torch.dtype | None, init: dict) -> tuple[list[dict[str, float]], float]:
    """``plan.steps`` steps from ``init``; every step's four losses, and the seconds the steps took
    (the model is built before the clock starts). The recipe's optimiser
    (frcnn.training.build_optimizer, momentum, weight decay, warm-up), lr per image x batch."""
    from frcnn import LOSS_KEYS, FasterRCNN, total_loss
    from frcnn.config import TrainConfig, load_config
    from frcnn.precision import autocast
    from frcnn.training import build_optimizer, lr_factor

    _, train = load_config("vgg16_voc")
    tcfg = TrainConfig.from_dict({**train, "warmup_steps": max(1, plan.steps // 10)})
    base_lr = tcfg.lr_for(plan.batch) * (10 if plan.tiny else 1)  # tiny: overfits a few images in few steps
    model = FasterRCNN(cfg, load_backbone_weights=False).to(plan.device)
    model.load_state_dict(init)
    model.train()
    opt = build_optimizer(model, tcfg, base_lr)
    curve = []
    _sync(plan.device)
    t0 = time.perf_counter()
    for step, images, targets in batches(data, plan.batch, plan.steps, plan.device):
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(step, plan.steps, tcfg)
        torch.manual_seed(1000 + step)  # the same anchor and RoI samples in both precisions
        with autocast(plan.device, amp):
            losses = model(images, targets)
        loss = total_loss(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip_norm)
        opt.step()
        curve.append({k: float(losses[k].detach()) for k in LOSS_KEYS} | {"total": float(loss.detach())})
        if not math.isfinite(curve[-1]["total"]):
            break
    _sync(plan.device)
    return curve, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class _Bench:
    """One model of the speed comparison on the device: its inputs, optimiser, a training step
    and an inference step as production runs them."""

    def __init__(self, name: str, cfg, data, plan: Plan) -> None:
        from frcnn import FasterRCNN

        self.name, self.dev = name, plan.device
        torch.manual_seed(0)
        self.model = (FasterRCNN(cfg) if name == "ours" else torchvision_model(cfg)).to(self.dev)
        _, images, targets = next(batches(data, plan.batch, 1, self.dev))
        if name == "ours":
            from frcnn.inference import Detector

            self.inputs = (images, targets)
            self.amp = Detector(self.model).amp  # Detector's autocast on this device (bf16 on CUDA)
            self.detect_args = (images, [1.0] * images.shape[0], [tuple(images.shape[-2:])] * images.shape[0])
        else:
            self.inputs = ([im.float() / 255 for im in images],
                           [{"boxes": b, "labels": lab} for b, lab in zip(targets["boxes"], targets["labels"],
                                                                            strict=True)])
            self.amp = torch.bfloat16 if self.dev.type == "cuda" else None  # the same precision as ours
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step(self) -> None:
        from frcnn import total_loss
        from frcnn.precision import autocast

        self.model.train()
        with autocast(self.dev, torch.bfloat16):
            losses = self.model(*self.inputs)
        self.opt.zero_grad(set_to_none=True)
        (total_loss(losses) if self.name == "ours" else sum(losses.values())).backward()
        self.opt.step()

    def infer_step(self) -> None:
        from frcnn.precision import autocast

        self.model.eval()
        with torch.no_grad(), autocast(self.dev, self.amp):
            if self.name == "ours":
                self.model.detect(*self.detect_args)  # what Detector.predict runs after decoding
            else:
                self.model(self.inputs[0])


def peak_train_memory(name: str, cfg, data, plan: Plan) -> float:
    """GiB at the peak of one training step, the model alone on the device (after two warm-up
    steps), then freed."""
    bench = _Bench(name, cfg, data, plan)
    for _ in range(2):
        bench.train_step()
    _sync(plan.device)
    torch.cuda.reset_peak_memory_stats(plan.device)
    bench.train_step()
    _sync(plan.device)
    peak = torch.cuda.max_memory_allocated(plan.device) / 2**30
    del bench
    torch.cuda.empty_cache()
    return peak


def speed(cfg, data, plan: Plan) -> dict[str, Any]:
    """Train and infer images/s, ours against torchvision's; peak memory of a train step, each alone."""
    out: dict[str, Any] = {"peak_mem_gib": {}}
    names = ("ours", "torchvision")
    if plan.device.type == "cuda":
        out["peak_mem_gib"] = {k: peak_train_memory(k, cfg, data, plan) for k in names}
    benches = {k: _Bench(k, cfg, data, plan) for k in names}
    for b in benches.values():  # warm-up outside the clocks: cuDNN autotuning, the allocator
        for _ in range(2):
            b.train_step()
            b.infer_step()

    def clock(step):
        def sample() -> float:
            _sync(plan.device)
            t = time.perf_counter()
            for _ in range(plan.timed_steps):
                step()
            _sync(plan.device)
            return (time.perf_counter() - t) / plan.timed_steps
        return sample

    train = interleaved({k: clock(b.train_step) for k, b in benches.items()}, plan.rounds)
    infer = interleaved({k: clock(b.infer_step) for k, b in benches.items()}, plan.rounds)
    out["train_ips"] = {k: plan.batch / min(v) for k, v in train.items()}
    out["infer_ips"] = {k: plan.batch / min(v) for k, v in infer.items()}
    out["infer_dtype"] = {k: str(b.amp or torch.float32) for k, b in benches.items()}
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
    init = {k: v.clone() for k, v in FasterRCNN(cfg, load_backbone_weights=False).state_dict().items()}
    if plan.device.type == "cuda":  # float32 means float32: no TF32 in the reference run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    curves, secs = {}, {}
    for name, amp in (("bf16", torch.bfloat16), ("fp32", None)):
        curves[name], secs[name] = train_curve(cfg, data, plan, amp, init)
        w = windows(curves[name], "total")
        _say(f"{name}: {len(curves[name])} steps in {secs[name]:.1f} s; total loss by fifths "
             + " ".join(f"{v:.3f}" for v in w))
    if plan.device.type == "cuda":  # as training sets it: speed is measured as production runs
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        torch.backends.cudnn.benchmark = True
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
    for kind, dtype in (("train", "bf16"), ("infer", sp["infer_dtype"]["ours"].replace("torch.", ""))):
        ips = sp[f"{kind}_ips"]
        rows.append((f"{kind} images/s, {dtype}", f"torchvision {ips['torchvision']:.1f}",
                     f"ours {ips['ours']:.1f} ({ips['ours'] / ips['torchvision']:.2f}x)", None))
    if sp["peak_mem_gib"]:
        m = sp["peak_mem_gib"]
        rows.append(("peak GPU memory, train step, alone", f"torchvision {m['torchvision']:.2f} GiB",
                     f"ours {m['ours']:.2f} GiB", None))
    result = {"plan": {k: str(v) for k, v in dataclasses.asdict(plan).items()}, "curves": curves,
              "speed": sp, "seconds": secs, "device_name": torch.cuda.get_device_name(plan.device)
              if plan.device.type == "cuda" else "cpu"}
    return result, rows


def recipe_file(folder: Path) -> Path:
    """The recipe's config (frcnn/configs/vgg16_voc.yaml) with random backbone weights (the device
    machines have no network) on the generated dataset's classes, written to ``folder``."""
    import yaml

    from frcnn.config import config_file
    from pipelines.synth import SYNTH_CLASSES

    data = yaml.safe_load(config_file("vgg16_voc").read_text())
    data["model"]["backbone"]["weights"] = None
    data["model"].update(num_classes=len(SYNTH_CLASSES), class_names=list(SYNTH_CLASSES))
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _frcnn_jobs(*args: str, env: dict[str, str]) -> None:
    import subprocess

    _say("frcnn-jobs " + " ".join(args))
    subprocess.run([sys.executable, "-c", "from jobs.cli import main; main()", *args], env=env, check=True)


def train_images_per_s(tracking_uri: str, experiment: str) -> float:
    """The newest train run's images/s (all ranks together), median of its logging windows after
    the first (the first holds cuDNN's autotuning and the data path's start)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "system/perf/images_per_s"),
                                      key=lambda m: m.step)]
    return float(np.median(values[1:] if len(values) > 1 else values))


def scaling(gpus: int, images: int, folder: Path) -> tuple[dict[str, Any], list]:
    """The real ``frcnn-jobs train`` on the recipe (random weights, ``images`` generated images at
    VOC's sizes) on 1 GPU and on ``gpus``: images/s per GPU and the scaling efficiency."""
    import os

    from pipelines.synth import VOC_LIKE_SIZES, generate

    folder.mkdir(parents=True, exist_ok=True)
    config = recipe_file(folder)
    generate(str(folder / "synth"), n_images=images, seed=0, sizes=VOC_LIKE_SIZES)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    shards = str(folder / "shards")
    _frcnn_jobs("precompute", "--data-root", str(folder / "synth"), "--split", "trainval", "--config", str(config),
                "--out", shards, "--overwrite", "--experiment", "gpu-check", env=env)
    ips = {}
    for n in sorted({1, gpus}):
        _frcnn_jobs("train", "--data", shards, "--config", str(config), "--workers", str(n), "--gpus-per-worker",
                    "1", "--epochs", "3", "--experiment", f"gpu-check-{n}", "--storage-path",
                    str(folder / "ray_results"), env=env)
        ips[n] = train_images_per_s(uri, f"gpu-check-{n}")
    per_gpu = {n: v / n for n, v in ips.items()}
    efficiency = ips[gpus] / (gpus * ips[1])
    rows = [(f"frcnn-jobs train, {n} GPU{'s' if n > 1 else ''}", f"{images} images, recipe, batch 1 per GPU",
             f"{ips[n]:.1f} images/s ({per_gpu[n]:.1f} per GPU)", None) for n in sorted(ips)]
    if gpus > 1:
        rows.append((f"scaling, 1 -> {gpus} GPUs", "images/s / (N x 1-GPU images/s)", f"{efficiency:.2f}", None))
    return {"images_per_s": ips, "per_gpu": per_gpu, "efficiency": efficiency}, rows


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
    ap.add_argument("--gpus", type=int, default=0,
                    help="also run the real `frcnn-jobs train` on 1 and on N GPUs (images/s per GPU, scaling)")
    ap.add_argument("--images", type=int, default=400, help="generated images for --gpus")
    ap.add_argument("--workdir", type=Path, default=Path("gpu-check-work"), help="where --gpus writes its runs")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    if tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = Plan(device=torch.device("cuda" if cuda and not args.tiny else "cpu"), tiny=tiny,
                steps=args.steps or (12 if tiny else 300), batch=args.batch or (2 if tiny else 4),
                n_images=2 if tiny else 64, rounds=2 if tiny else 5, timed_steps=1 if tiny else 10)
    result, rows = run(plan)
    if args.gpus:
        result["scaling"], more = scaling(args.gpus, args.images, args.workdir)
        rows += more
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0 if all(ok is not False for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
