"""Training images/s at equal batch: one square canvas vs aspect-ratio buckets, same images.

The VOC recipe scaled down for a CPU: the paper's rule at short side 192, long side <= 320 (600 and
1000 x 0.32); one 320x320 canvas (the recipe's single 1008x1008 canvas, scaled) against buckets
192x320, 320x192 and 192x192. Images are generated at ``pipelines.synth.VOC_LIKE_SIZES``, put on
the canvases and labelled by the precompute's per-image code (``process_item``), then the same
training step as ``jobs.train_loop`` (stored targets, fresh anchor sample, forward, backward, SGD)
runs on batches of one bucket (``jobs.train_data.bucket_batches``). The two configurations
alternate in rounds so that load on a shared machine hits both alike.

    .venv/bin/python -m benchmarks.bucket_bench --backbone tiny --rounds 5 --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import numpy as np
import torch

from frcnn import FasterRCNN, total_loss
from frcnn.canvas import CanvasTransform
from frcnn.config import BackboneConfig, CanvasConfig, ModelConfig, RoIHeadConfig, tiny_config
from frcnn.training import TrainConfig, build_optimizer
from jobs.train_data import bucket_batches, row_buckets
from pipelines import schema
from pipelines.precompute_rows import process_item
from pipelines.synth import SYNTH_CLASSES, VOC_LIKE_SIZES, generate
from pipelines.voc import list_split

SHORT, LONG = 192, 320
BUCKETS = ((SHORT, LONG), (LONG, SHORT), (SHORT, SHORT))


def configs(backbone: str) -> dict[str, ModelConfig]:
    base = tiny_config(5, SYNTH_CLASSES, canvas=LONG)
    if backbone == "vgg16":
        base = ModelConfig(num_classes=5, class_names=SYNTH_CLASSES, canvas=base.canvas,
                           backbone=BackboneConfig(name="vgg16"),
                           roi=RoIHeadConfig(representation_size=1024, dropout=0.0))
    square = CanvasConfig(height=LONG, width=LONG, short_side=SHORT, max_long_side=LONG)
    buckets = CanvasConfig(height=SHORT, width=SHORT, short_side=SHORT, max_long_side=LONG, buckets=BUCKETS)
    return {f"one {LONG}x{LONG}": base.replace(canvas=square),
            "buckets " + ", ".join(f"{h}x{w}" for h, w in BUCKETS): base.replace(canvas=buckets)}


def rows_for(cfg: ModelConfig, root: str) -> list[dict]:
    spec = {"cfg": cfg.to_dict(), "class_names": list(SYNTH_CLASSES), "dataset_classes": list(SYNTH_CLASSES),
            "use_difficult": False, "drop_empty": False, "jpeg_quality": 95, "data_root": root, "root_shown": root}
    return [r for r in (process_item(dataclasses.asdict(i), spec).row for i in list_split(root, "trainval")) if r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "vgg16"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration per round")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = configs(args.backbone)
    with tempfile.TemporaryDirectory() as root:
        generate(root, n_images=args.images, seed=0, sizes=VOC_LIKE_SIZES)
        prepared = {}
        for name, cfg in cfgs.items():
            rows = rows_for(cfg, root)
            batch = schema.decode_batch({k: [r[k] for r in rows] for k in rows[0]}, cfg.anchor_positions())
            order = np.random.default_rng(0).permutation(len(rows))
            steps = len(rows) // args.batch
            batches = [schema.to_model_inputs({k: [v[i] for i in idx] if isinstance(v, list) else v[idx]
                                               for k, v in batch.items()})
                       for idx in bucket_batches(order, row_buckets(batch), args.batch, steps)[0]]
            t = CanvasTransform.from_config(cfg.canvas)
            pad = statistics.fmean(t.padding_share(int(r["orig_height"]), int(r["orig_width"])) for r in rows)
            torch.manual_seed(0)
            model = FasterRCNN(cfg).train()
            opt = build_optimizer(model, TrainConfig(), 0.001)
            prepared[name] = {"batches": batches, "model": model, "opt": opt, "pad": pad, "ips": [], "i": 0,
                              "pixels": statistics.fmean(int(b[0].shape[-2]) * int(b[0].shape[-1]) for b in batches)}
        print(f"{args.backbone}, {len(rows)} images at VOC_LIKE_SIZES, batch {args.batch}, {args.threads} thread(s), "
              f"{args.rounds} rounds x {args.steps} steps per configuration")

        def step(p) -> int:
            images, targets = p["batches"][p["i"] % len(p["batches"])]
            p["i"] += 1
            loss = total_loss(p["model"](images, targets))
            p["opt"].zero_grad(set_to_none=True)
            loss.backward()
            p["opt"].step()
            return images.shape[0]

        for p in prepared.values():  # warm-up: first-call allocations, each bucket's anchor grid
            for _ in range(3):
                step(p)
        for _ in range(args.rounds):
            for p in prepared.values():
                t0, n = time.perf_counter(), 0
                for _ in range(args.steps):
                    n += step(p)
                p["ips"].append(n / (time.perf_counter() - t0))
    base = None
    for name, p in prepared.items():
        med = statistics.median(p["ips"])
        base = base or med
        print(f"{name:40s} padding {p['pad'] * 100:5.1f} %  canvas px/image {p['pixels']:8.0f}  "
              f"train {med:6.2f} images/s (median of rounds {', '.join(f'{x:.2f}' for x in p['ips'])})  "
              f"{med / base:.2f}x")


if __name__ == "__main__":
    main()
