"""Rows 2 and 3: the Ray Data precompute job (``pipelines.precompute.precompute``) on N = 200 and
10N = 2,000 synth images at the walkthrough's default 800x800 canvas (``ModelConfig()`` with the
five synth classes), and its peak memory at N and 10N images.

Row 2's floor is the work no pipeline can skip, on the same images and the same cores: a
``multiprocessing`` pool of ``os.cpu_count()`` processes doing read file -> PIL decode ->
``CanvasTransform.apply_image`` -> JPEG encode (quality 95, as precompute). Ray start-up is
excluded: a first small run warms Ray's workers, then floor and pipeline are timed in interleaved
rounds (best of each), at N (3 rounds) and at 10N (1 round: 2,000 images at 800x800 take
minutes). The pipeline time is the wall time of the whole ``precompute()`` call (listing, Ray
Data plan, shards, manifest, publish).

Row 3: peak RSS of the driver plus every Ray worker process, sampled every 50 ms
(``common.PeakRSS``), during a run of N images and a run of 10N (separate runs from row 2's timed
ones, so that the sampler's own CPU does not slow the timed pipeline).

The driver holds a handle to the precompute ledger actor for the whole Ray session: without one,
the named actor dies whenever the previous run's handles are garbage-collected, and a run that
starts at that moment gets a dying actor (``ActorDiedError``: see docs/benchmarks.md).

When row 2 misses its goal, the same images are also processed in this process, one torch thread,
step by step (the floor's steps vs the pipeline's per-image ``process``, and the anchor targets
alone), and the CPU time of every process of the Ray session is accounted for one run: where the
time goes, for the note.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import PeakRSS, interleaved, ray_up, say

THROUGHPUT_GOAL = 0.80
MEMORY_GOAL = 1.2


def floor_image(args: tuple[str, int]) -> int:
    """Read, decode, put on the canvas, JPEG-encode: the floor of any precompute pipeline."""
    from frcnn.canvas import CanvasTransform
    from frcnn.images import decode_image
    from pipelines.schema import encode_canvas

    path, canvas = args
    with open(path, "rb") as f:
        data = f.read()
    image = decode_image(data)
    arr, _ = CanvasTransform(canvas, canvas).apply_image(image)
    return len(encode_canvas(arr, 95))


def _cpu_by_kind(root) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of ``root`` and every descendant, with a kind per process."""
    import psutil

    out = {}
    for p in [root] + root.children(recursive=True):
        try:
            t = p.cpu_times()
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if p.pid == root.pid:
            kind = "driver"
        elif cmd and cmd[0].startswith("ray::"):
            kind = "ray_workers" if cmd[0].startswith(("ray::IDLE", "ray::MapBatches")) else "ray_actors"
        elif any("/ray/" in c for c in cmd[:3]):
            kind = "ray_daemons"
        else:
            kind = "other"
        out[p.pid] = (kind, t.user + t.system)
    return out


def _cpu_delta(before: dict, after: dict) -> dict[str, float]:
    agg: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        agg[kind] = agg.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return {k: round(v, 3) for k, v in agg.items()}


def per_image_breakdown(voc: Path, split: str, cfg, n: int) -> dict[str, Any]:
    """Milliseconds per image, in this process at one torch thread, interleaved image by image:
    the floor's steps, the pipeline's whole per-image work (``ImageWorker.process``: read, XML,
    decode, canvas, anchor targets, encode, row), and the anchor targets alone."""
    import dataclasses

    import numpy as np
    import torch

    from frcnn.anchors import assign_anchor_targets
    from pipelines.precompute_rows import ImageWorker
    from pipelines.storage import shown
    from pipelines.voc import list_split

    spec = {"cfg": cfg.to_dict(), "class_names": list(cfg.class_names), "use_difficult": False,
            "drop_empty": False, "jpeg_quality": 95, "data_root": str(voc), "root_shown": shown(str(voc))}
    items = [dataclasses.asdict(i) for i in list_split(str(voc), split)][:n]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = ImageWorker(spec)
        canvas = cfg.canvas.height
        for it in items[:3]:
            worker.process(it)
            floor_image((it["image_path"], canvas))
        acc = {"floor": 0.0, "process": 0.0, "anchor_targets": 0.0}
        for it in items:
            t0 = time.perf_counter()
            floor_image((it["image_path"], canvas))
            t1 = time.perf_counter()
            row = worker.process(it).row
            t2 = time.perf_counter()
            if row is not None:
                keep = ~np.asarray(row["difficult"], dtype=bool)
                boxes = torch.from_numpy(np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)[keep].copy())
                t3 = time.perf_counter()
                assign_anchor_targets(worker.anchors, boxes, (canvas, canvas), cfg.rpn.pos_iou, cfg.rpn.neg_iou,
                                      worker.coder)
                acc["anchor_targets"] += time.perf_counter() - t3
            acc["floor"] += t1 - t0
            acc["process"] += t2 - t1
    finally:
        torch.set_num_threads(saved)
    ms = {k: round(v / len(items) * 1e3, 2) for k, v in acc.items()}
    ms["images"] = len(items)
    ms["floor_over_process"] = round(ms["floor"] / ms["process"], 3)
    ms["anchor_share_of_process"] = round(ms["anchor_targets"] / ms["process"], 3)
    return ms


def run(quick: bool, ws, train_images: int) -> dict[str, Any]:
    """Rows 2 and 3 on the workspace's synth images (``benchmarks.workspace.Workspace``). Also
    precomputes ``train_images`` images at the tiny config for rows 6/7 (returned as
    ``train_shards``), while Ray is up."""
    import psutil
    import ray

    from frcnn.config import ModelConfig, tiny_config
    from pipelines.precompute import precompute
    from pipelines.precompute_job import get_ledger
    from pipelines.synth import SYNTH_CLASSES

    n = 24 if quick else 200
    rounds = 2 if quick else 3
    rounds_10n = 1
    cpus = os.cpu_count() or 1
    work = ws.root
    voc = ws.voc
    ws.split("bench_warm", 16)
    ws.split("bench_n", n)
    ws.split("bench_10n", 10 * n)
    ws.split("bench_train", train_images)
    all_paths = [str(p) for p in ws.image_paths(10 * n)]
    paths = all_paths[:n]

    cfg = ModelConfig(num_classes=len(SYNTH_CLASSES), class_names=SYNTH_CLASSES)  # 800x800 canvas
    canvas = cfg.canvas.height
    pool = mp.get_context("spawn").Pool(cpus)  # spawn: no fork of a process that runs Ray threads
    try:
        t = time.perf_counter()
        pool.map(floor_image, [(p, canvas) for p in paths[: 2 * cpus]], chunksize=1)  # warm the pool
        say(f"rows 2/3: floor pool of {cpus} processes warm in {time.perf_counter() - t:.1f} s")
        ray_up()
        _ledger = get_ledger()  # held for the session: see the module docstring
        me = psutil.Process()
        t = time.perf_counter()
        precompute(str(voc), "bench_warm", str(work / "out_warm"), cfg, overwrite=True, progress=False)
        say(f"rows 2/3: Ray up and workers warm (first precompute of 16 images) in {time.perf_counter() - t:.1f} s")

        last: dict[str, Any] = {}
        cpu_floor: dict[int, list[float]] = {n: [], 10 * n: []}
        cpu_pipeline: dict[int, list[dict[str, float]]] = {n: [], 10 * n: []}

        def floor_sample(size: int):
            def sample() -> float:
                todo = all_paths[:size]
                chunk = max(1, len(todo) // (4 * cpus))
                kids = [p for p in me.children() if p.pid in {w.pid for w in pool._pool}]
                c0 = sum(sum(k.cpu_times()[:2]) for k in kids)
                t0 = time.perf_counter()
                pool.map(floor_image, [(p, canvas) for p in todo], chunksize=chunk)
                dt = time.perf_counter() - t0
                cpu_floor[size].append(sum(sum(k.cpu_times()[:2]) for k in kids) - c0)
                say(f"rows 2/3: floor {size} images: {dt:.2f} s ({size / dt:.1f} img/s)")
                return dt
            return sample

        def pipeline_sample(size: int):
            split = "bench_n" if size == n else "bench_10n"

            def sample() -> float:
                c0 = _cpu_by_kind(me)
                t0 = time.perf_counter()
                s = precompute(str(voc), split, str(work / f"out_{split}"), cfg, overwrite=True, progress=False)
                dt = time.perf_counter() - t0
                cpu_pipeline[size].append({"wall_s": round(dt, 3), **_cpu_delta(c0, _cpu_by_kind(me))})
                last[size] = dict(rows=s.rows, shards=len(s.shards), positives=s.positives_per_image)
                say(f"rows 2/3: precompute {size} images: {dt:.2f} s ({size / dt:.1f} img/s)")
                return dt
            return sample

        samples = interleaved({"floor": floor_sample(n), "pipeline": pipeline_sample(n)}, rounds)
        best = {k: min(v) for k, v in samples.items()}
        ips = {k: n / v for k, v in best.items()}
        frac = ips["pipeline"] / ips["floor"]
        say(f"row 2: {n} images: floor {ips['floor']:.1f} img/s, precompute {ips['pipeline']:.1f} img/s -> "
            f"{frac:.0%} of the floor")
        samples10 = interleaved({"floor": floor_sample(10 * n), "pipeline": pipeline_sample(10 * n)}, rounds_10n)
        best10 = {k: min(v) for k, v in samples10.items()}
        ips10 = {k: 10 * n / v for k, v in best10.items()}
        frac10 = ips10["pipeline"] / ips10["floor"]
        say(f"row 2: {10 * n} images: floor {ips10['floor']:.1f} img/s, precompute {ips10['pipeline']:.1f} img/s -> "
            f"{frac10:.0%} of the floor")

        with PeakRSS() as mem_n:
            t0 = time.perf_counter()
            precompute(str(voc), "bench_n", str(work / "out_n"), cfg, overwrite=True, progress=False)
            dt_n = time.perf_counter() - t0
        say(f"row 3: peak RSS driver+workers {mem_n.peak_workers / 2**20:.0f} MiB at {n} images "
            f"({mem_n.samples} samples)")
        with PeakRSS() as mem10:
            t0 = time.perf_counter()
            s10 = precompute(str(voc), "bench_10n", str(work / "out_10n"), cfg, overwrite=True, progress=False)
            dt10 = time.perf_counter() - t0
        peak_n = mem_n.peak_workers
        ratio = mem10.peak_workers / peak_n
        say(f"row 3: peak RSS {peak_n / 2**20:.0f} MiB at {n} images, {mem10.peak_workers / 2**20:.0f} MiB at "
            f"{10 * n} -> {ratio:.2f}x")

        breakdown = None
        if min(frac, frac10) < THROUGHPUT_GOAL:
            say(f"row 2: goal missed: per-image breakdown in this process (1 torch thread, {min(n, 100)} images)")
            try:
                breakdown = per_image_breakdown(voc, "bench_n", cfg, min(n, 100))
                say(f"row 2: per image: floor steps {breakdown['floor']} ms, "
                    f"pipeline process() {breakdown['process']} ms "
                    f"(anchor targets {breakdown['anchor_targets']} ms) -> "
                    f"floor/process {breakdown['floor_over_process']:.0%}")
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not lose the row
                say(f"row 2: breakdown failed: {type(exc).__name__}: {exc}")

        t = time.perf_counter()
        train_shards = work / f"train_shards_{train_images}"
        precompute(str(voc), "bench_train", str(train_shards), tiny_config(len(SYNTH_CLASSES), SYNTH_CLASSES),
                   overwrite=True, progress=False)
        say(f"rows 6/7: {train_images} images precomputed at the tiny config (192x192) in "
            f"{time.perf_counter() - t:.1f} s")
    finally:
        pool.terminate()
        pool.join()
        if ray.is_initialized():
            ray.shutdown()

    def mib(b: float) -> float:
        return round(b / 2**20, 1)


    def cpu_account(size: int, smp: dict[str, list[float]], bst: dict[str, float]) -> dict[str, float]:
        cpu_best = cpu_pipeline[size][smp["pipeline"].index(bst["pipeline"])]
        return {"floor_cpu_ms_per_image": round(statistics.median(cpu_floor[size]) / size * 1e3, 2),
                "pipeline_worker_cpu_ms_per_image": round(cpu_best.get("ray_workers", 0.0) / size * 1e3, 2),
                "pipeline_overhead_cpu_s": round(sum(v for k, v in cpu_best.items()
                                                     if k not in ("wall_s", "ray_workers", "other")), 3),
                "pipeline_worker_utilisation": round(cpu_best.get("ray_workers", 0.0) / (cpus * cpu_best["wall_s"]), 3)}

    acc_n, acc_10n = cpu_account(n, samples, best), cpu_account(10 * n, samples10, best10)
    row2 = {
        "id": "2",
        "what": (f"precompute throughput, {n} and {10 * n} synth images at the default 800x800 canvas, "
                 f"all {cpus} cores"),
        "baseline": (f"floor: read+decode+resize+JPEG encode only, Pool({cpus}), same images: "
                     f"{ips['floor']:.1f} img/s ({n}), {ips10['floor']:.1f} img/s ({10 * n})"),
        "figure": (f"{frac:.0%} of the floor at {n} ({ips['pipeline']:.1f} img/s), {frac10:.0%} at {10 * n} "
                   f"({ips10['pipeline']:.1f} img/s)"),
        "goal": f">= {THROUGHPUT_GOAL:.0%} of the floor at both",
        "met": min(frac, frac10) >= THROUGHPUT_GOAL, "value": min(frac, frac10),
        "data": {"images": [n, 10 * n], "canvas": canvas, "cpus": cpus, "rounds": [rounds, rounds_10n],
                 "best_s": {n: best, 10 * n: best10}, "images_per_s": {n: ips, 10 * n: ips10},
                 "fraction_of_floor": {n: round(frac, 3), 10 * n: round(frac10, 3)},
                 "samples_s": {n: samples, 10 * n: samples10},
                 "statistic": "best of rounds (floor and pipeline interleaved, at each size)",
                 "output": {str(k): v for k, v in last.items()},
                 "cpu_s_floor_runs": {k: [round(c, 3) for c in v] for k, v in cpu_floor.items()},
                 "cpu_s_pipeline_runs": cpu_pipeline, "cpu_accounting": {n: acc_n, 10 * n: acc_10n},
                 "per_image_breakdown_1_thread": breakdown},
        "auto_note": (f"Ray start-up excluded (warm run first); pipeline time = whole precompute() call incl. publish; "
                      f"{rounds} rounds at {n}, {rounds_10n} at {10 * n}; CPU per image at {n}: floor "
                      f"{acc_n['floor_cpu_ms_per_image']:.1f} ms, pipeline workers "
                      f"{acc_n['pipeline_worker_cpu_ms_per_image']:.1f} ms (at {10 * n}: "
                      f"{acc_10n['floor_cpu_ms_per_image']:.1f} / "
                      f"{acc_10n['pipeline_worker_cpu_ms_per_image']:.1f} ms); "
                      f"workers busy {acc_n['pipeline_worker_utilisation']:.0%} / "
                      f"{acc_10n['pipeline_worker_utilisation']:.0%} of the wall x cores; driver + Ray actors/daemons "
                      f"{acc_n['pipeline_overhead_cpu_s']:.2f} / {acc_10n['pipeline_overhead_cpu_s']:.2f} "
                      "CPU-s per run"),
    }
    row3 = {
        "id": "3",
        "what": f"precompute peak memory (driver + Ray workers RSS, 50 ms sampling) at N={n} and 10N={10 * n} images",
        "baseline": f"itself at N: {mib(peak_n):.0f} MiB",
        "figure": f"{ratio:.2f}x ({mib(mem10.peak_workers):.0f} MiB at 10N)",
        "goal": f"<= {MEMORY_GOAL}x",
        "met": ratio <= MEMORY_GOAL, "value": ratio,
        "data": {"n": n, "peak_rss_n_mib": mib(peak_n), "peak_rss_10n_mib": mib(mem10.peak_workers),
                 "peak_rss_incl_ray_daemons_n_mib": mib(mem_n.peak_all),
                 "peak_rss_incl_ray_daemons_10n_mib": mib(mem10.peak_all),
                 "ratio_incl_ray_daemons": round(mem10.peak_all / mem_n.peak_all, 3),
                 "ray_worker_processes_n": mem_n.max_workers_seen, "ray_worker_processes_10n": mem10.max_workers_seen,
                 "samples_n": mem_n.samples, "samples_10n": mem10.samples, "seconds_n": round(dt_n, 2),
                 "seconds_10n": round(dt10, 2), "rows_10n": s10.rows, "shards_10n": len(s10.shards)},
        "auto_note": (f"{mem_n.max_workers_seen} / {mem10.max_workers_seen} ray:: processes at N / 10N (each imports "
                      f"torch); with Ray's daemons (raylet, GCS, agents) counted too: "
                      f"{mem10.peak_all / mem_n.peak_all:.2f}x"),
    }
    return {"throughput": row2, "memory": row3, "train_shards": str(train_shards)}
