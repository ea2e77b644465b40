"""Rows 8 and 9: what a user of the commands gets, against the bare model work in the same run.

Run one row alone (a few minutes each on two cores; ``--quick``: under a minute):

    .venv/bin/python -m benchmarks.run --only 8          # or --only 9, --only 8,9
    .venv/bin/python -m benchmarks.run --only 9 --quick  # smoke test, results in a temp folder

``--only`` writes its ``results.json``/``RESULTS.md`` into a temporary folder unless ``--out`` is
given, so a partial run never replaces the committed full results.

Row 8: ``frcnn-jobs train`` = ``jobs.train.run_training`` (1 worker, 1 CPU, 1 torch thread, Ray
Train, Ray Data, MLflow in a temporary SQLite store) on synth images precomputed at the tiny
config (192x192 canvas), with the training schedule of ``configs/demo.yaml`` (batch 8, its
logging, checkpoint and validation intervals; no validation split), 3 epochs of 256 images. Its
images/s is measured inside the run, from the MLflow timestamps of its first and last logged
``loss_total`` (steps 20..96: two epoch boundaries, logging and metric reduction inside; start-up
and the final checkpoint outside, reported separately as "end to end"), so the logged timestamps
must stay the times the steps finished. Ray is started once before the runs (as a running
cluster would be). Baseline: the bare training loop in this process on the same decoded rows:
``to_model_inputs``, ``hflip_batch``, forward, ``total_loss``, backward, gradient
clipping, SGD step, the LR schedule -- the work of ``train_loop`` without Ray, MLflow, logging or
metric reduction (JPEG decoding done beforehand, as Ray Data does it beside the worker). Same
model, canvas, batch 8, one torch thread. The bare loop is measured before and after the run (best of the two).

Row 9: ``frcnn-jobs infer`` = ``pipelines.infer.run_inference`` over a folder of N synth JPEGs
(160-400 px, decoded and resized to the model's 192x192 canvas inside the pipeline), batch 8, the
CLI's defaults (one predictor at a time, 1 CPU), with Ray already up; images/s = N / wall time of
the whole call (listing, decode, detect, write, publish). The headline is a call whose predictor
workers are warm (a driver's later calls: Ray reuses the worker processes, which keep torch and
the model); the first call after Ray's start, which imports torch in the workers (one `frcnn-jobs
infer` run), is measured first and reported beside it. Baseline: the same model's
``detect()`` alone in this process on pre-decoded canvases, batch 8, one torch thread. The floor
per image (read + decode + put on the canvas, one thread) is reported beside it, and
``jobs.evaluate.predict_split`` (the path ``frcnn-jobs evaluate`` takes) over the same images.
The model is row 8's trained checkpoint when row 8 ran, else one trained here by the bare loop
(a trained model's detections, not a random one's, set the NMS work).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import REPO, interleaved, mlflow_store, ray_up, say
from .workspace import Workspace

TRAIN_GOAL = 0.90
INFER_GOAL = 0.70


# --------------------------------------------------------------------------------------- shared
def demo_train_section() -> dict[str, Any]:
    """The ``train:`` section of the demo config (wherever the config folder lives)."""
    import yaml

    for p in (REPO / "frcnn" / "configs" / "demo.yaml", REPO / "configs" / "demo.yaml"):
        if p.is_file():
            return dict(yaml.safe_load(p.read_text()).get("train") or {})
    raise FileNotFoundError(f"demo.yaml not found under {REPO / 'frcnn' / 'configs'} or {REPO / 'configs'}")


def train_config(epochs: int):
    from frcnn.training import TrainConfig

    data = demo_train_section()
    data["epochs"] = epochs
    return TrainConfig.from_dict(data)


def load_rows(shards: str) -> tuple[dict[str, Any], Any]:
    """Every precomputed row of ``shards``, decoded (as Ray Data's decode step gives them), and
    the model config of the manifest."""
    import pyarrow.parquet as pq

    from frcnn.config import ModelConfig
    from pipelines.schema import decode_batch, read_manifest_at

    manifest = read_manifest_at(shards)
    cfg = ModelConfig.from_dict(manifest["model_config"])
    table = pq.read_table([str(Path(shards) / s) for s in manifest["shards"]])
    return decode_batch(table.to_pydict(), cfg.num_anchor_positions), cfg


def _take(decoded: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in decoded.items()}


class BareLoop:
    """``train_loop``'s per-step work with nothing around it (see the module docstring)."""

    def __init__(self, decoded: dict[str, Any], cfg, tcfg, seed: int = 0) -> None:
        from frcnn import FasterRCNN
        from frcnn.training import build_optimizer

        torch.manual_seed(seed)
        self.cfg, self.tcfg = cfg, tcfg
        self.model = FasterRCNN(cfg).train()
        self.base_lr = tcfg.lr_for(tcfg.batch_size)
        self.optimizer = build_optimizer(self.model, tcfg, self.base_lr)
        n = len(decoded["image_id"])
        order = list(range(n))
        random.Random(seed).shuffle(order)
        b = tcfg.batch_size
        self.batches = [_take(decoded, order[i:i + b]) for i in range(0, n - b + 1, b)]
        self.step_no = 0
        self.total_steps = 10_000

    def step(self) -> None:
        from frcnn import total_loss
        from frcnn.training import hflip_batch, lr_factor
        from pipelines.schema import to_model_inputs

        batch = self.batches[self.step_no % len(self.batches)]
        images, targets = to_model_inputs(batch)
        flip = torch.rand(images.shape[0]) < self.tcfg.hflip_prob
        images, targets = hflip_batch(images, targets, flip, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * lr_factor(self.step_no, self.total_steps, self.tcfg)
        loss = total_loss(self.model(images, targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip_norm)
        self.optimizer.step()
        self.step_no += 1

    def images_per_s(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.tcfg.batch_size / (time.perf_counter() - t)

    def checkpoint_bytes(self) -> bytes:
        from frcnn.training import checkpoint_state

        buf = io.BytesIO()
        torch.save(checkpoint_state(self.model, None, 0, self.step_no, self.cfg, self.tcfg), buf)
        return buf.getvalue()


def _one_thread():
    """Context: one torch thread in this process (the worker's and the actor's setting)."""
    class _T:
        def __enter__(self):
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

        def __exit__(self, *exc):
            torch.set_num_threads(self.saved)
    return _T()


def _kwargs_for(fn, **kwargs) -> dict[str, Any]:
    """Only the keyword arguments ``fn`` accepts (the commands' options evolve)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


# ---------------------------------------------------------------------------------------- row 8
def run_train(quick: bool, ws: Workspace, work: Path) -> dict[str, Any]:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.train import run_training

    images = 64 if quick else 256
    epochs = 2 if quick else 3
    rounds = 1  # a run takes minutes; the bare loop is measured before and after it
    shards = ws.train_shards(images)
    tcfg = train_config(epochs)
    if quick:  # 8 steps an epoch: log often enough to span an epoch boundary
        tcfg = dataclasses.replace(tcfg, log_every=4)
    batch = tcfg.batch_size
    steps_per_epoch = images // batch
    decoded, cfg = load_rows(shards)
    runs: list[dict[str, Any]] = []
    bare_ips: list[float] = []
    loop = BareLoop(decoded, cfg, tcfg)
    with _one_thread():
        for _ in range(3):
            loop.step()  # warm-up: allocator, oneDNN primitives
    best_ckpt: str | None = None

    def bare() -> float:
        with _one_thread():
            ips = loop.images_per_s(steps_per_epoch)
        bare_ips.append(ips)
        say(f"row 8: bare loop {ips:.1f} img/s ({steps_per_epoch} steps, batch {batch}, 1 thread)")
        return 1.0 / ips

    def pipeline() -> float:
        nonlocal best_ckpt
        t = time.perf_counter()
        res = run_training(shards, None, **_kwargs_for(
            run_training, train_cfg=tcfg, workers=1, cpus_per_worker=1, experiment="bench",
            storage_path=str(work / "ray_results"), model_name=None, tracking_uri=uri,
            run_name=f"bench-row8-{len(runs)}", progress_every=0))
        wall = time.perf_counter() - t
        best_ckpt = res.best_checkpoint_path or res.checkpoint_path
        client = MlflowClient(uri)
        hist = sorted(client.get_metric_history(res.run_id, "train/loss_total"), key=lambda m: m.step)
        logged = [m.value for m in sorted(client.get_metric_history(res.run_id, "system/perf/images_per_s"),
                                          key=lambda m: m.step)]
        if len(hist) < 2 or hist[-1].step - hist[0].step < steps_per_epoch:
            raise RuntimeError(f"run {res.run_id} logged loss_total at steps {[m.step for m in hist]}: too few "
                               "windows to measure across an epoch boundary")
        first, last = hist[0], hist[-1]
        ips = (last.step - first.step) * batch / ((last.timestamp - first.timestamp) / 1e3)
        runs.append({"run_id": res.run_id, "wall_s": round(wall, 2), "images_per_s": ips,
                     "from_step": first.step, "to_step": last.step,
                     "seconds_between": (last.timestamp - first.timestamp) / 1e3,
                     "end_to_end_images_per_s": epochs * steps_per_epoch * batch / wall,
                     "logged_images_per_s": logged})
        say(f"row 8: run_training {epochs} epochs in {wall:.1f} s; steps {first.step}..{last.step} at "
            f"{ips:.1f} img/s (its own logged windows: {statistics.fmean(logged) if logged else float('nan'):.1f})")
        return 1.0 / ips

    try:
        with mlflow_store(work) as uri:
            ray_up(1)
            say(f"row 8: {images} images, batch {batch}, runs of {epochs} epochs, {rounds} round(s)")
            interleaved({"bare": bare, "run_training": pipeline}, rounds)
            bare()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    best_bare = max(bare_ips)
    best_run = max(r["images_per_s"] for r in runs)
    frac = best_run / best_bare
    ckpt = None
    if best_ckpt:
        p = Path(best_ckpt)
        files = [p] if p.is_file() else sorted(p.rglob("*.pt"))
        ckpt = files[0].read_bytes() if files else None
    return {
        "row": {
            "id": "8",
            "what": (f"`frcnn-jobs train` (run_training, 1 worker, 1 CPU, 1 torch thread), tiny model, "
                     f"{cfg.canvas.height}x{cfg.canvas.width} canvas, batch {batch}, {images} images"),
            "baseline": f"the bare training loop, same model/batch/thread, in-process: {best_bare:.1f} img/s",
            "figure": f"{frac:.0%} ({best_run:.1f} img/s across epochs)",
            "goal": f">= {TRAIN_GOAL:.0%}", "met": frac >= TRAIN_GOAL, "value": frac,
            "data": {"images": images, "batch": batch, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                     "rounds": rounds, "bare_images_per_s": bare_ips, "runs": runs,
                     "statistic": "bare loop before and after one run_training (best of the two)",
                     "train_config": tcfg.to_dict()},
            "auto_note": (f"steps {runs[-1]['from_step']}..{runs[-1]['to_step']} of a {epochs}-epoch run, timed by "
                          f"its MLflow metric timestamps (epoch boundaries and logging inside, start-up outside; "
                          f"Ray already up); end to end incl. start-up and the final checkpoint: "
                          f"{max(r['end_to_end_images_per_s'] for r in runs):.1f} img/s; mean of the run's own "
                          "logged images_per_s windows: "
                          f"{statistics.fmean(runs[-1]['logged_images_per_s'] or [0]):.1f}"),
        },
        "checkpoint": ckpt,
    }


# ---------------------------------------------------------------------------------------- row 9
def _floor_and_canvases(model, paths: list[Path]) -> tuple[float, list, list, list]:
    """Read + decode + canvas + to_tensor of every image, one thread: the decode floor (ms per
    image) and the pre-decoded canvases for ``detect()``."""
    from frcnn.canvas import to_tensor
    from frcnn.images import decode_image

    canvases, scales, sizes = [], [], []
    with _one_thread():
        t = time.perf_counter()
        for p in paths:
            image = decode_image(p.read_bytes())
            canvas, scale = model.canvas.apply_image(image)
            canvases.append(to_tensor(canvas))
            scales.append(scale)
            sizes.append((image.height, image.width))
        ms = (time.perf_counter() - t) / len(paths) * 1e3
    return ms, canvases, scales, sizes


def run_infer(quick: bool, ws: Workspace, work: Path, checkpoint: bytes | None = None) -> dict[str, Any]:
    import ray

    from frcnn.training import load_checkpoint, model_from_checkpoint
    from pipelines.infer import run_inference

    n = 64 if quick else 600
    rounds = 1 if quick else 3
    batch = 8
    source = "row 8's run_training checkpoint"
    if checkpoint is None:
        shards = ws.train_shards(64 if quick else 256)
        decoded, cfg = load_rows(shards)
        loop = BareLoop(decoded, cfg, train_config(1))
        steps = 8 if quick else 96
        with _one_thread():
            for _ in range(steps):
                loop.step()
        checkpoint = loop.checkpoint_bytes()
        source = f"trained here by the bare loop ({steps} steps, batch {loop.tcfg.batch_size})"
    model = model_from_checkpoint(load_checkpoint(io.BytesIO(checkpoint))).eval()
    folder = work / "infer_input"
    folder.mkdir(parents=True, exist_ok=True)
    paths = ws.image_paths(n)
    for p in paths:
        shutil.copyfile(p, folder / p.name)
    floor_ms, canvases, scales, sizes = _floor_and_canvases(model, paths)
    say(f"row 9: {n} images, decode+canvas floor {floor_ms:.2f} ms/image (1 thread); model from {source}")
    n_det = min(n, 256)
    det_batches = [(torch.stack(canvases[i:i + batch]), scales[i:i + batch], sizes[i:i + batch])
                   for i in range(0, n_det - batch + 1, batch)]
    with _one_thread():
        for b in det_batches[:2]:
            model.detect(*b)  # warm-up
    detections = []
    summaries: list[dict[str, Any]] = []

    def detect_only() -> float:
        with _one_thread():
            t = time.perf_counter()
            k = 0
            for b in det_batches:
                dets = model.detect(*b)
                k += len(b[2])
            dt = time.perf_counter() - t
        detections.append(sum(int(d["scores"].numel()) for d in dets) / len(dets))
        say(f"row 9: detect() alone {k / dt:.1f} img/s (batch {batch}, 1 thread)")
        return dt / k

    counter = iter(range(1000))
    n_small = 16

    def timed_call(src: Path) -> tuple[float, Any]:
        out = work / f"infer_out_{next(counter)}"
        t = time.perf_counter()
        s = run_inference(str(src), str(out), checkpoint, **_kwargs_for(
            run_inference, batch_size=batch, concurrency=1, cpus_per_actor=1, progress=False))
        dt = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        return dt, s

    def pipeline() -> float:
        # A 16-image call first, same settings: its wall is the per-call fixed cost (Ray Data's
        # plan and executor start, the ledger, publish; the predictor workers are warm) plus two
        # batches.
        small_dt, _ = timed_call(warm)
        dt, s = timed_call(folder)
        steady = (n - n_small) / (dt - small_dt) if dt > small_dt else float("nan")
        summaries.append({"wall_s": round(dt, 3), "written": s.written, "failed": s.failed,
                          "detections": s.detections, "pipeline_images_per_s": s.images_per_s,
                          "wall_s_16_images": round(small_dt, 3), "images_per_s_beyond_16": round(steady, 2)})
        if s.written != n:
            raise RuntimeError(f"run_inference wrote {s.written} rows for {n} images ({s.failed} failed)")
        say(f"row 9: run_inference {n} images in {dt:.1f} s ({n / dt:.1f} img/s; its own count "
            f"{s.images_per_s:.1f} img/s); {n_small} images in {small_dt:.1f} s just before, so "
            f"{steady:.1f} img/s beyond them")
        return dt / n

    evaluate: dict[str, Any] | None = None
    warm = work / "infer_warm"
    try:
        ray_up(1)
        warm.mkdir(exist_ok=True)
        for p in paths[:n_small]:
            shutil.copyfile(p, warm / p.name)
        # The first call after Ray's start, as one `frcnn-jobs infer` run makes it: Ray's workers
        # import torch and load the model (predictor tasks keep both for the driver's later calls).
        cold_dt, _ = timed_call(folder)
        say(f"row 9: Ray up, first run_inference (cold workers) of {n} images in {cold_dt:.1f} s "
            f"({n / cold_dt:.1f} img/s)")
        samples = interleaved({"detect": detect_only, "run_inference": pipeline}, rounds)
        try:
            from jobs.evaluate import predict_split
            from pipelines.groundtruth import load_ground_truth

            gt = load_ground_truth(str(ws.voc), ws.split(f"bench_eval_{n}", n))
            t = time.perf_counter()
            dets, errors, stats = predict_split(gt, checkpoint, str(ws.voc), batch_size=batch)
            dt = time.perf_counter() - t
            done = len(dets) + len(errors)
            evaluate = {"images": done, "errors": len(errors), "wall_s": round(dt, 2),
                        "images_per_s": round(done / dt, 2), "own_images_per_s": stats.get("images_per_s")}
            say(f"row 9: evaluate's predict_split {done} images in {dt:.1f} s ({done / dt:.1f} img/s)")
        except Exception as exc:  # noqa: BLE001 - the evaluate figure is context, not the row
            evaluate = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            say(f"row 9: evaluate's predict_split failed: {evaluate['error']}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    best = {k: 1.0 / min(v) for k, v in samples.items()}  # images/s
    frac = best["run_inference"] / best["detect"]
    cold_frac = n / cold_dt / best["detect"]
    ev = (f"; evaluate (predict_split): {evaluate['images_per_s']:.1f} img/s" if evaluate and "images_per_s" in evaluate
          else "")
    small = [r["wall_s_16_images"] for r in summaries]
    full = [r["wall_s"] for r in summaries]
    return {
        "id": "9",
        "what": (f"`frcnn-jobs infer` (run_inference, {n} JPEGs 160-400 px, decode included, batch {batch}, "
                 f"1 predictor x 1 CPU), tiny model, {model.cfg.canvas.height}x{model.cfg.canvas.width} canvas"),
        "baseline": (f"model-only detect() on pre-decoded canvases, batch {batch}, 1 torch thread: "
                     f"{best['detect']:.1f} img/s"),
        "figure": f"{frac:.0%} ({best['run_inference']:.1f} img/s, whole call, predictor workers warm)",
        "goal": f">= {INFER_GOAL:.0%}", "met": frac >= INFER_GOAL, "value": frac,
        "data": {"images": n, "batch": batch, "rounds": rounds, "images_per_s": best,
                 "samples_s_per_image": samples, "decode_floor_ms_per_image": round(floor_ms, 3),
                 "detections_per_image": detections, "runs": summaries, "evaluate": evaluate,
                 "cold_call": {"wall_s": round(cold_dt, 3), "images_per_s": round(n / cold_dt, 2),
                               "fraction_of_detect": round(cold_frac, 4)},
                 "model": source, "statistic": "best of rounds (detect() and run_inference interleaved)"},
        # The rate beyond the 16 images (in "runs") is a difference of two noisy walls: data, not headline.
        "auto_note": (f"the first call after Ray's start (cold workers: torch import, model load), as one "
                      f"`frcnn-jobs infer` run makes it: {cold_dt:.1f} s, {cold_frac:.0%} of detect(); then "
                      f"a {n_small}-image call took {min(small):.1f}-{max(small):.1f} s, "
                      f"the {n}-image calls {min(full):.1f}-{max(full):.1f} s; "
                      f"floor: read+decode+canvas {floor_ms:.2f} ms/image at 1 thread; model from {source}; "
                      f"Ray up before; mean detections/image "
                      f"{statistics.fmean(detections):.1f}{ev}"),
    }
