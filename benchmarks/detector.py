"""Rows 4 and 5: training and inference images/s of our detector against torchvision's
``FasterRCNN`` built on the same backbone, canvas, anchors, head width and proposal counts.

Both models get the same synthetic batch (synth images put on the tiny config's 192x192 canvas),
run in this one process with the same torch threads (one for the headline figure: what a training
worker uses by default; the default thread count too), and are timed in interleaved rounds. Ours
trains from precomputed anchor targets (``anchor_labels``/``anchor_deltas`` assigned before the
clock starts, as the precompute job stores them); torchvision computes its own in every step.

torchvision's model: ``tiny_body(channels)`` with ``out_channels`` set, ``AnchorGenerator`` with
our sizes (stride x scales = 32/64/128) and ratios, ``MultiScaleRoIAlign(["0"], 7, 2)``
(torchvision's default sampling ratio), ``TwoMLPHead(C*7*7, 256)`` and a ``FastRCNNPredictor`` of the
same width, ``min_size=max_size=canvas``, and our RPN/RoI sample sizes, proposal counts, score and
NMS thresholds. Ours keeps its own design: a 1x1 conv to 32 channels before RoI pooling
(Light-Head), sampling ratio 1.
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import numpy as np
import torch

from .common import interleaved, say

TRAIN_GOAL = 1.1
INFER_GOAL = 1.0


def synthetic_batch(cfg, batch: int, seed: int = 0):
    """``batch`` synth images with at least one object, on the config's canvas."""
    from frcnn.canvas import CanvasTransform
    from pipelines.synth import SYNTH_CLASSES, render_image

    ct = CanvasTransform(cfg.canvas.height, cfg.canvas.width)
    rng = np.random.default_rng(seed)
    images, boxes, labels = [], [], []
    while len(images) < batch:
        w, h = (int(v) for v in rng.integers(160, 401, size=2))
        image, objects = render_image(rng, w, h)
        if not objects:
            continue
        canvas, scale = ct.apply_image(image)
        images.append(torch.from_numpy(canvas).permute(2, 0, 1).contiguous())
        boxes.append(torch.tensor([o["box"] for o in objects], dtype=torch.float32) * scale)
        labels.append(torch.tensor([SYNTH_CLASSES.index(o["name"]) + 1 for o in objects], dtype=torch.int64))
    return torch.stack(images), boxes, labels


def torchvision_faster_rcnn(cfg, body, out_channels: int, head_width: int, sampling_ratio: int):
    """torchvision's FasterRCNN around ``body`` with our config's anchors, proposal counts, samples
    and thresholds, a TwoMLPHead ``head_width`` wide, and canvases not resized (min_size = the
    canvas). Rows 4/5 (tiny body) and ``make gpu-check`` (VGG16) build their baseline with it."""
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    body.out_channels = out_channels
    sizes = tuple(int(round(cfg.anchors.stride * s)) for s in cfg.anchors.scales)
    rpn, roi = cfg.rpn, cfg.roi
    return TVFasterRCNN(
        body, num_classes=None,
        min_size=cfg.canvas.height, max_size=max(cfg.canvas.height, cfg.canvas.width),
        image_mean=list(cfg.canvas.mean), image_std=list(cfg.canvas.std),
        rpn_anchor_generator=AnchorGenerator((sizes,), (tuple(cfg.anchors.ratios),)),
        rpn_pre_nms_top_n_train=rpn.pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn.post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn.post_nms_top_n_test,
        rpn_nms_thresh=rpn.nms_thresh, rpn_fg_iou_thresh=rpn.pos_iou, rpn_bg_iou_thresh=rpn.neg_iou,
        rpn_batch_size_per_image=rpn.batch_size_per_image, rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], roi.pool_size, sampling_ratio),
        box_head=TwoMLPHead(out_channels * roi.pool_size**2, head_width),
        box_predictor=FastRCNNPredictor(head_width, cfg.num_classes + 1),
        box_score_thresh=roi.score_thresh, box_nms_thresh=roi.nms_thresh,
        box_detections_per_img=roi.detections_per_img,
        box_fg_iou_thresh=roi.fg_iou, box_bg_iou_thresh=roi.bg_iou_hi,
        box_batch_size_per_image=roi.batch_size_per_image, box_positive_fraction=roi.positive_fraction,
    )


def torchvision_model(cfg):
    from frcnn.backbones import tiny_body

    return torchvision_faster_rcnn(cfg, tiny_body(tuple(cfg.backbone.tiny_channels)), cfg.backbone.tiny_channels[-1],
                                   cfg.roi.representation_size, sampling_ratio=2)


def _setup(cfg, batch: int, device: torch.device):
    from frcnn import FasterRCNN
    from frcnn.anchors import assign_anchor_targets

    torch.manual_seed(0)
    images, boxes, labels = synthetic_batch(cfg, batch)
    ours = FasterRCNN(cfg)
    hw = (cfg.canvas.height, cfg.canvas.width)
    targets = [assign_anchor_targets(ours.anchors, b, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, ours.rpn_coder)
               for b in boxes]  # precomputed: outside the clock, as the precompute job does it
    ours_targets = {"boxes": [b.to(device) for b in boxes], "labels": [lb.to(device) for lb in labels],
                    "anchor_labels": torch.stack([t.labels for t in targets]).to(device),
                    "anchor_deltas": torch.stack([t.deltas for t in targets]).to(device)}
    tv = torchvision_model(cfg)
    ours.to(device)
    tv.to(device)
    ours_images = images.to(device)
    tv_images = [im.to(device).float() / 255.0 for im in images]  # torchvision's input contract
    tv_targets = [{"boxes": b.to(device), "labels": lb.to(device)} for b, lb in zip(boxes, labels, strict=True)]
    n_params = {"ours": sum(p.numel() for p in ours.parameters()),
                "torchvision": sum(p.numel() for p in tv.parameters())}
    return ours, ours_images, ours_targets, tv, tv_images, tv_targets, n_params


def run(quick: bool, device_name: str = "cpu", amp: bool = False, threads: int | None = None,
        rounds: int | None = None) -> dict[str, Any]:
    """Rows 4 and 5 on ``device_name`` with ``threads`` torch threads (default: as set);
    ``amp``: bf16 autocast (the GPU rows)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(quick, device_name, amp, rounds)
    finally:
        torch.set_num_threads(saved)


def _run(quick: bool, device_name: str, amp: bool, rounds: int | None) -> dict[str, Any]:
    from frcnn import tiny_config
    from pipelines.synth import SYNTH_CLASSES

    device = torch.device(device_name)
    cfg = tiny_config(len(SYNTH_CLASSES), SYNTH_CLASSES)
    batch = 2 if quick else 8
    if device.type == "cuda" and not quick:
        batch = 32
    rounds = rounds or (1 if quick else 5)
    steps = 1 if quick else (10 if device.type == "cuda" else 2)
    ours, o_img, o_tgt, tv, t_img, t_tgt, n_params = _setup(cfg, batch, device)
    o_opt = torch.optim.SGD(ours.parameters(), lr=1e-3, momentum=0.9)
    t_opt = torch.optim.SGD(tv.parameters(), lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def train_step(model, opt, images, targets):
        with autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step(model, images):
        with torch.no_grad(), autocast():
            model(images)

    def clock(fn, n):
        def sample() -> float:
            sync()
            import time

            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            return (time.perf_counter() - t) / n
        return sample

    tag = f"{device.type}{' bf16' if amp else ''}"
    say(f"rows 4/5 ({tag}): batch {batch} on a {cfg.canvas.height}x{cfg.canvas.width} canvas, "
        f"{torch.get_num_threads()} torch threads, params ours {n_params['ours']:,} / "
        f"torchvision {n_params['torchvision']:,}")
    ours.train()
    tv.train()
    o_train = functools.partial(train_step, ours, o_opt, o_img, o_tgt)
    t_train = functools.partial(train_step, tv, t_opt, t_img, t_tgt)
    for _ in range(1 if quick else 2):  # warm-up: allocator, oneDNN primitives, cuDNN autotune
        o_train()
        t_train()
    train = interleaved({"torchvision": clock(t_train, steps), "ours": clock(o_train, steps)}, rounds)
    ours.eval()
    tv.eval()
    o_inf = functools.partial(infer_step, ours, o_img)
    t_inf = functools.partial(infer_step, tv, t_img)
    for _ in range(1 if quick else 2):
        o_inf()
        t_inf()
    infer = interleaved({"torchvision": clock(t_inf, steps), "ours": clock(o_inf, steps)}, rounds)

    def summarize(samples):
        best = {k: min(v) for k, v in samples.items()}
        ips = {k: batch / v for k, v in best.items()}
        return best, ips, ips["ours"] / ips["torchvision"]

    tr_best, tr_ips, tr_ratio = summarize(train)
    in_best, in_ips, in_ratio = summarize(infer)
    say(f"row 4 ({tag}): train ours {tr_ips['ours']:.1f} img/s, torchvision {tr_ips['torchvision']:.1f} "
        f"-> {tr_ratio:.2f}x")
    say(f"row 5 ({tag}): infer ours {in_ips['ours']:.1f} img/s, torchvision {in_ips['torchvision']:.1f} "
        f"-> {in_ratio:.2f}x")
    common = {"device": str(device), "amp": "bf16" if amp else None, "batch": batch, "canvas": cfg.canvas.height,
              "torch_threads": torch.get_num_threads(), "rounds": rounds, "steps_per_sample": steps,
              "params": n_params, "statistic": "best of rounds (torchvision and ours interleaved)"}
    suffix = " (GPU, bf16)" if device.type == "cuda" else ""
    rid = "g" if device.type == "cuda" else ""
    return {
        "train": {
            "id": f"4{rid}",
            "what": (f"training images/s{suffix}, tiny backbone, {cfg.canvas.height}x{cfg.canvas.width} canvas, "
                     f"batch {batch}, {torch.get_num_threads()} torch thread(s)"),
            "baseline": (f"torchvision FasterRCNN, same backbone/anchors/head width/proposal counts: "
                         f"{tr_ips['torchvision']:.2f} img/s"),
            "figure": f"{tr_ratio:.2f}x ({tr_ips['ours']:.2f} img/s)",
            "goal": f">= {TRAIN_GOAL}x", "met": tr_ratio >= TRAIN_GOAL, "value": tr_ratio,
            "data": {**common, "best_step_s": tr_best, "images_per_s": tr_ips,
                     "median_step_s": {k: statistics.median(v) for k, v in train.items()}, "samples_s": train},
            "auto_note": ("ours from precomputed anchor targets, torchvision assigns its own; SGD step included; "
                          f"{common['torch_threads']} torch thread(s), one process"),
        },
        "infer": {
            "id": f"5{rid}",
            "what": (f"inference images/s{suffix}, same model size and canvas, batch {batch}, "
                     f"{torch.get_num_threads()} torch thread(s)"),
            "baseline": f"the same torchvision model in eval mode: {in_ips['torchvision']:.2f} img/s",
            "figure": f"{in_ratio:.2f}x ({in_ips['ours']:.2f} img/s)",
            "goal": f">= {INFER_GOAL}x", "met": in_ratio >= INFER_GOAL, "value": in_ratio,
            "data": {**common, "best_batch_s": in_best, "images_per_s": in_ips,
                     "median_batch_s": {k: statistics.median(v) for k, v in infer.items()}, "samples_s": infer},
            "auto_note": (f"no_grad, eval mode, same score/NMS thresholds and detections per image; "
                          f"{common['torch_threads']} torch thread(s)"),
        },
    }
