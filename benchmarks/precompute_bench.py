"""Rows 2 and 3: the Ray Data precompute job (``pipelines.precompute.precompute``) on N synth images
at the walkthrough's default 800x800 canvas (``ModelConfig()`` with the five synth classes), and
its peak memory at N and 10N images.

Row 2's floor is the work no pipeline can skip, on the same images and the same cores: a
``multiprocessing`` pool of ``os.cpu_count()`` processes doing read file -> PIL decode ->
``CanvasTransform.apply_image`` -> JPEG encode (quality 95, as precompute). Ray start-up is
excluded: a first small run warms Ray's workers, then floor and pipeline are timed in interleaved
rounds (best of each). The pipeline time is the wall time of the whole ``precompute()`` call
(listing, Ray Data plan, shards, manifest, publish).

Row 3: peak RSS of the driver plus every Ray worker process, sampled every 50 ms
(``common.PeakRSS``), during a run of N images and a run of 10N (separate runs from row 2's timed
ones, so that the sampler's own CPU does not slow the timed pipeline).

The driver holds a handle to the precompute ledger actor for the whole Ray session: without one,
the named actor dies whenever the previous run's handles are garbage-collected, and a run that
starts at that moment gets a dying actor (``ActorDiedError``: see RESULTS.md, other findings).

When row 2 misses its goal, the same images are also processed in this process, one torch thread,
step by step (the floor's steps vs the pipeline's per-image ``process``, and the anchor targets
alone), and the CPU time of every process of the Ray session is accounted for one run: where the
time goes, for the note.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import PeakRSS, interleaved, say

THROUGHPUT_GOAL = 0.60
MEMORY_GOAL = 1.2


def floor_image(args: tuple[str, int]) -> int:
    """Read, decode, put on the canvas, JPEG-encode: the floor of any precompute pipeline."""
    from PIL import Image

    from frcnn.canvas import CanvasTransform
    from pipelines.schema import encode_canvas

    path, canvas = args
    with open(path, "rb") as f:
        data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()
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
    the floor's steps, the pipeline's whole per-image work (``_Worker.process``: read, XML,
    decode, canvas, anchor targets, encode, row), and the anchor targets alone."""
    import dataclasses

    import numpy as np
    import torch

    from frcnn.anchors import assign_anchor_targets
    from pipelines.precompute import _shown, _Worker
    from pipelines.voc import list_split

    spec = {"cfg": cfg.to_dict(), "class_names": list(cfg.class_names), "use_difficult": False,
            "drop_empty": False, "jpeg_quality": 95, "data_root": str(voc), "root_shown": _shown(str(voc))}
    items = [dataclasses.asdict(i) for i in list_split(str(voc), split)][:n]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker = _Worker(spec)
        canvas = cfg.canvas.height
        for it in items[:3]:
            worker.process(it)
            floor_image((it["image_path"], canvas))
        acc = {"floor": 0.0, "process": 0.0, "anchor_targets": 0.0}
        for it in items:
            t0 = time.perf_counter()
            floor_image((it["image_path"], canvas))
            t1 = time.perf_counter()
            row = worker.process(it)[0]
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


def write_split(voc_root: Path, name: str, ids: list[str]) -> None:
    sets = voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def run(quick: bool, work: Path, train_images: int) -> dict[str, Any]:
    """Rows 2 and 3. Also precomputes ``train_images`` images at the tiny config for rows 6/7
    (returned as ``train_shards``), while Ray is up."""
    import psutil
    import ray

    from frcnn.config import ModelConfig, tiny_config
    from pipelines.precompute import _get_ledger, precompute
    from pipelines.synth import SYNTH_CLASSES, generate

    n = 24 if quick else 200
    rounds = 2 if quick else 3
    cpus = os.cpu_count() or 1
    voc = work / "voc"
    total = max(10 * n, train_images)
    t = time.perf_counter()
    summary = generate(str(voc), n_images=total, seed=11)
    say(f"rows 2/3: generated {total} synth images ({summary['objects']} objects, 160-400 px) in "
        f"{time.perf_counter() - t:.1f} s")
    ids = [f"{i:06d}" for i in range(total)]
    write_split(voc, "bench_warm", ids[:16])
    write_split(voc, "bench_n", ids[:n])
    write_split(voc, "bench_10n", ids[:10 * n])
    write_split(voc, "bench_train", ids[:train_images])
    paths = [str(voc / "VOCdevkit" / "VOC2007" / "JPEGImages" / f"{i}.jpg") for i in ids[:n]]

    cfg = ModelConfig(num_classes=len(SYNTH_CLASSES), class_names=SYNTH_CLASSES)  # 800x800 canvas
    canvas = cfg.canvas.height
    pool = mp.get_context("spawn").Pool(cpus)  # spawn: no fork of a process that runs Ray threads
    try:
        t = time.perf_counter()
        pool.map(floor_image, [(p, canvas) for p in paths[: 2 * cpus]], chunksize=1)  # warm the pool
        say(f"rows 2/3: floor pool of {cpus} processes warm in {time.perf_counter() - t:.1f} s")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ledger = _get_ledger()  # held for the session: see the module docstring  # noqa: F841
        me = psutil.Process()
        t = time.perf_counter()
        precompute(str(voc), "bench_warm", str(work / "out_warm"), cfg, overwrite=True, progress=False)
        say(f"rows 2/3: Ray up and workers warm (first precompute of 16 images) in {time.perf_counter() - t:.1f} s")

        last: dict[str, Any] = {}
        cpu_floor: list[float] = []
        cpu_pipeline: list[dict[str, float]] = []

        def floor_sample() -> float:
            chunk = max(1, len(paths) // (4 * cpus))
            kids = [p for p in me.children() if p.pid in {w.pid for w in pool._pool}]
            c0 = sum(sum(k.cpu_times()[:2]) for k in kids)
            t0 = time.perf_counter()
            pool.map(floor_image, [(p, canvas) for p in paths], chunksize=chunk)
            dt = time.perf_counter() - t0
            cpu_floor.append(sum(sum(k.cpu_times()[:2]) for k in kids) - c0)
            return dt

        def pipeline_sample() -> float:
            c0 = _cpu_by_kind(me)
            t0 = time.perf_counter()
            s = precompute(str(voc), "bench_n", str(work / "out_n"), cfg, overwrite=True, progress=False)
            dt = time.perf_counter() - t0
            cpu_pipeline.append({"wall_s": round(dt, 3), **_cpu_delta(c0, _cpu_by_kind(me))})
            last.update(rows=s.rows, shards=len(s.shards), positives=s.positives_per_image)
            say(f"rows 2/3: precompute {n} images: {dt:.2f} s ({n / dt:.1f} img/s)")
            return dt

        samples = interleaved({"floor": floor_sample, "pipeline": pipeline_sample}, rounds)
        best = {k: min(v) for k, v in samples.items()}
        ips = {k: n / v for k, v in best.items()}
        frac = ips["pipeline"] / ips["floor"]
        say(f"row 2: floor {ips['floor']:.1f} img/s, precompute {ips['pipeline']:.1f} img/s -> {frac:.0%} of the floor")

        with PeakRSS() as mem_n:
            t0 = time.perf_counter()
            precompute(str(voc), "bench_n", str(work / "out_n"), cfg, overwrite=True, progress=False)
            dt_n = time.perf_counter() - t0
        say(f"row 3: peak RSS driver+workers {mem_n.peak_workers / 2**20:.0f} MiB at {n} images ({mem_n.samples} samples)")
        with PeakRSS() as mem10:
            t0 = time.perf_counter()
            s10 = precompute(str(voc), "bench_10n", str(work / "out_10n"), cfg, overwrite=True, progress=False)
            dt10 = time.perf_counter() - t0
        peak_n = mem_n.peak_workers
        ratio = mem10.peak_workers / peak_n
        say(f"row 3: peak RSS {peak_n / 2**20:.0f} MiB at {n} images, {mem10.peak_workers / 2**20:.0f} MiB at "
            f"{10 * n} ({10 * n / dt10:.1f} img/s, {10 * n / dt10 / ips['floor']:.0%} of the floor rate) -> {ratio:.2f}x")

        breakdown = None
        if frac < THROUGHPUT_GOAL:
            say(f"row 2: goal missed: per-image breakdown in this process (1 torch thread, {min(n, 100)} images)")
            try:
                breakdown = per_image_breakdown(voc, "bench_n", cfg, min(n, 100))
                say(f"row 2: per image: floor steps {breakdown['floor']} ms, pipeline process() {breakdown['process']} ms "
                    f"(anchor targets {breakdown['anchor_targets']} ms) -> floor/process {breakdown['floor_over_process']:.0%}")
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not lose the row
                say(f"row 2: breakdown failed: {type(exc).__name__}: {exc}")

        t = time.perf_counter()
        train_shards = work / "train_shards"
        precompute(str(voc), "bench_train", str(train_shards), tiny_config(len(SYNTH_CLASSES), SYNTH_CLASSES),
                   overwrite=True, progress=False)
        say(f"rows 6/7: {train_images} images precomputed at the tiny config (192x192) in {time.perf_counter() - t:.1f} s")
    finally:
        pool.terminate()
        pool.join()
        if ray.is_initialized():
            ray.shutdown()

    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    i_best = samples["pipeline"].index(best["pipeline"])
    cpu_best = cpu_pipeline[i_best]
    worker_ms = cpu_best.get("ray_workers", 0.0) / n * 1e3
    floor_ms = statistics.median(cpu_floor) / n * 1e3
    overhead_cpu = sum(v for k, v in cpu_best.items() if k not in ("wall_s", "ray_workers", "other"))
    util = cpu_best.get("ray_workers", 0.0) / (cpus * cpu_best["wall_s"])
    row2 = {
        "id": "2",
        "what": f"precompute throughput, {n} synth images at the default 800x800 canvas, all {cpus} cores",
        "baseline": (f"floor: read+decode+resize+JPEG encode only, Pool({cpus}), same images: "
                     f"{ips['floor']:.1f} img/s"),
        "figure": f"{frac:.0%} of the floor ({ips['pipeline']:.1f} img/s)",
        "goal": f">= {THROUGHPUT_GOAL:.0%} of the floor",
        "met": frac >= THROUGHPUT_GOAL, "value": frac,
        "data": {"images": n, "canvas": canvas, "cpus": cpus, "rounds": rounds, "best_s": best, "images_per_s": ips,
                 "samples_s": samples, "statistic": "best of rounds (floor and pipeline interleaved)",
                 "shards": last.get("shards"), "positives_per_image": last.get("positives"),
                 "cpu_s_floor_runs": [round(c, 3) for c in cpu_floor], "cpu_s_pipeline_runs": cpu_pipeline,
                 "floor_cpu_ms_per_image": round(floor_ms, 2), "pipeline_worker_cpu_ms_per_image": round(worker_ms, 2),
                 "pipeline_overhead_cpu_s": round(overhead_cpu, 3), "pipeline_worker_utilisation": round(util, 3),
                 "images_per_s_10n": round(10 * n / dt10, 2), "fraction_of_floor_10n": round(10 * n / dt10 / ips["floor"], 3),
                 "per_image_breakdown_1_thread": breakdown},
        "auto_note": (f"Ray start-up excluded (warm run first); pipeline time = whole precompute() call incl. publish; "
                      f"CPU per image: floor {floor_ms:.1f} ms, pipeline workers {worker_ms:.1f} ms, workers busy "
                      f"{util:.0%} of the wall x cores, driver + Ray actors/daemons {overhead_cpu:.2f} CPU-s per run; "
                      f"at 10N: {10 * n / dt10 / ips['floor']:.0%} of the floor rate"),
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
