"""Rows 6 and 7: ``jobs.train.run_training`` for real (Ray Train, Ray Data, MLflow in a temporary
SQLite store) on synth images precomputed at the tiny config (192x192 canvas).

Row 6 reads ``data_wait_frac`` (time waiting for the next batch / step time, per logging window)
from the 1-worker MLflow run: mean over the logged windows after the first (the first holds the
pipeline start). Row 7 compares ``images_per_s`` of the 1-worker and 2-worker runs (same per-worker
batch and one CPU / one torch thread per worker; the effective batch doubles). Each run starts its
own Ray (as the CLI does) and shuts it down after, so the two runs do not share workers.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import mlflow_store, ray_up, say

WAIT_GOAL = 0.05


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _one_run(shards: str, work: Path, workers: int, train_cfg, uri: str) -> dict[str, Any]:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.train import run_training

    ray_up(workers)  # what run_training's init_ray would start, with retries (see common.ray_up)
    t = time.perf_counter()
    res = run_training(shards, None, train_cfg=train_cfg, workers=workers, cpus_per_worker=1,
                       experiment="bench", storage_path=str(work / "ray_results"), model_name=None,
                       tracking_uri=uri, run_name=f"bench-{workers}w")
    wall = time.perf_counter() - t
    if ray.is_initialized():
        ray.shutdown()
    client = MlflowClient(uri)
    wait = _history(client, res.run_id, "system/perf/data_wait_frac")
    ips = _history(client, res.run_id, "system/perf/images_per_s")
    def after(h: list) -> list:  # the windows after the first (the first holds the start-up)
        return [v for _, v in h[1:]] or [v for _, v in h]

    out = {
        "run_id": res.run_id, "workers": workers, "wall_s": wall, "logged_windows": len(wait),
        "data_wait_frac_mean": statistics.fmean(after(wait)), "data_wait_frac_max": max(after(wait)),
        "data_wait_frac_first": wait[0][1] if wait else None,
        "data_wait_frac": wait, "images_per_s_mean": statistics.fmean(after(ips)),
        "images_per_s_median": statistics.median(after(ips)), "images_per_s": ips,
    }
    say(f"rows 6/7: {workers} worker(s): {wall:.0f} s wall, {len(wait)} logged windows, "
        f"data_wait_frac {out['data_wait_frac_mean']:.1%} (max {out['data_wait_frac_max']:.1%}), "
        f"{out['images_per_s_mean']:.2f} img/s")
    return out


def run(quick: bool, shards: str, work: Path, images: int) -> dict[str, Any]:
    from frcnn.training import TrainConfig

    batch = 4 if quick else 8  # 8: frcnn/configs/demo.yaml's per-worker batch
    tcfg = TrainConfig(epochs=1 if quick else 4, batch_size=batch, base_lr=0.01, lr_reference_batch=8,
                       warmup_steps=5, log_every=2, seed=0, schedule="cosine")
    with mlflow_store(work) as uri:
        say(f"rows 6/7: run_training, {images} images, {tcfg.epochs} epoch(s), batch {batch} per worker, "
            f"log_every {tcfg.log_every}: 1 worker, then 2")
        one = _one_run(shards, work, 1, tcfg, uri)
        two = _one_run(shards, work, 2, tcfg, uri)
    wait = one["data_wait_frac_mean"]
    scale = two["images_per_s_mean"] / one["images_per_s_mean"]
    common = {"images": images, "canvas": 192, "epochs": tcfg.epochs, "batch_per_worker": batch,
              "log_every": tcfg.log_every, "cpus_per_worker": 1, "torch_threads_per_worker": 1}
    row6 = {
        "id": "6",
        "what": f"time waiting for data during training (run_training, 1 worker, tiny config, {images} images, "
                f"{tcfg.epochs} epochs, batch {batch})",
        "baseline": f"the step time ({one['images_per_s_mean']:.2f} img/s)",
        "figure": f"{wait:.1%} of the step time (worst window {one['data_wait_frac_max']:.1%})",
        "goal": f"<= {WAIT_GOAL:.0%}", "met": wait <= WAIT_GOAL, "value": wait,
        "data": {**common, "run": one},
        "auto_note": (f"mean of data_wait_frac over the {max(one['logged_windows'] - 1, 0)} logged windows after "
                      f"the first (first: {one['data_wait_frac_first']:.1%})"),
    }
    row7 = {
        "id": "7",
        "what": "training throughput from 1 to 2 workers on one machine",
        "baseline": f"1 worker: {one['images_per_s_mean']:.2f} img/s",
        "figure": f"{scale:.2f}x ({two['images_per_s_mean']:.2f} img/s with 2 workers)",
        "goal": "none (ratio stated)", "met": None, "value": scale,
        "data": {**common, "runs": {"1": one, "2": two}},
        "auto_note": (f"images_per_s from the MLflow runs (mean over windows after the first); 1 CPU and 1 torch "
                      f"thread per worker, so {os.cpu_count()} cores bound it, shared with the Ray Data decode tasks "
                      f"and gloo's all-reduce; data_wait_frac {one['data_wait_frac_mean']:.1%} with 1 worker, "
                      f"{two['data_wait_frac_mean']:.1%} with 2 (each epoch start waits for the slower rank)"),
    }
    return {"wait": row6, "scaling": row7}
