"""Run the benchmark suite and write ``results.json`` and ``RESULTS.md``.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--out DIR]     # `make bench`
    python -m benchmarks.run --only 8          # one row (or a list: --only 1,9), results in a temp folder

Rows (see ``RESULTS.md`` for the table and ``benchmarks/__init__.py`` for the modules):
1 anchor targets vs the walkthrough loop; 2 precompute vs the decode+resize+encode floor; 3 its
peak memory at N and 10N; 4 / 5 training / inference images/s vs torchvision's FasterRCNN; 6 data
wait during training; 7 one to two training workers; 8 `frcnn-jobs train` vs the bare training
loop; 9 `frcnn-jobs infer` vs the model-only detect(); 10 COCO instances ingest (train2017-sized)
vs json.load. ``--device cuda`` adds rows 4 and 5 on the
GPU with bf16 autocast. Every figure is a ratio measured in this run (interleaved rounds, best
of each): the shared 2-core machine makes absolute timings meaningless.

Full run: under 20 minutes on the 2-core CI machine; writes into ``benchmarks/``. ``--quick``
(smaller sizes, a smoke test) and ``--only`` write into a temporary folder unless ``--out`` is
given, so they never replace the committed results. Every row runs alone too: the synthetic
data it needs is generated for it (``benchmarks/workspace.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import report
from .common import environment, load_average, say
from .workspace import Workspace

HERE = Path(__file__).resolve().parent
ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")
NO_GPU = "not measured (no GPU lent to this session)"


def _failed(rid: str, what: str, exc: BaseException) -> dict[str, Any]:
    say(f"row {rid}: FAILED: {type(exc).__name__}: {exc}")
    return {"id": rid, "what": what, "baseline": "-", "figure": f"not measured: {type(exc).__name__}: {exc}"[:300],
            "goal": "-", "met": False, "value": None, "error": traceback.format_exc()[-4000:]}


def _gpu_rows(reason: str) -> list[dict[str, Any]]:
    return [{"id": "4g", "what": "training images/s on the GPU (bf16 autocast) vs torchvision", "baseline": "-",
             "figure": reason, "goal": ">= 1.1x", "met": None, "value": None},
            {"id": "5g", "what": "inference images/s on the GPU (bf16 autocast) vs torchvision", "baseline": "-",
             "figure": reason, "goal": ">= 1.0x", "met": None, "value": None}]


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: also rows 4 and 5 on the GPU with bf16 autocast (default: cpu).")
    ap.add_argument("--quick", action="store_true", help="Smaller sizes: a smoke test of the whole suite.")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="Where results.json and RESULTS.md go (default: benchmarks/, or a temp folder with --quick).")
    ap.add_argument("--only", "--rows", dest="rows", default=None, metavar="LIST",
                    help="Comma-separated rows to run (default: all), e.g. --only 8 or --only 1,9; results go to a "
                         "temporary folder unless --out is given.")
    ap.add_argument("--render-only", action="store_true",
                    help="Only regenerate RESULTS.md from the results.json already in --out (no measurement).")
    ap.add_argument("--readme", action="store_true", help="With --render-only: also print the README's table.")
    ap.add_argument("--merge", action="store_true",
                    help="With --only: replace these rows in the results.json already in --out and keep the others "
                         "(each row records its run; RESULTS.md names the rows measured later).")
    args = ap.parse_args(argv)
    wanted = set(args.rows.split(",")) if args.rows else set(ROWS)
    unknown = wanted - set(ROWS) - {"4g", "5g"}
    if unknown:
        ap.error(f"unknown row(s) {', '.join(sorted(unknown))}: rows are {', '.join(ROWS)}")
    partial = bool(args.rows) and wanted != set(ROWS)
    if args.render_only:
        target = Path(args.out) if args.out else HERE
        result = json.loads((target / "results.json").read_text())
        (target / "RESULTS.md").write_text(report.render(result))
        print(f"wrote {target / 'RESULTS.md'} from {target / 'results.json'}")
        if args.readme:
            print(report.readme_table(result["rows"]))
        return 0
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="frcnn-bench-quick-" if args.quick else "frcnn-bench-rows-"))
        if args.quick or partial else HERE)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    t_start = time.perf_counter()
    load_before = load_average()
    env = environment()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    say(f"start: {'quick' if args.quick else 'full'} run, device {args.device}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads, load average {load_before}, torch {env['versions']['torch']}, "
        f"ray {env['versions']['ray']}")
    rows: dict[str, dict[str, Any]] = {}
    partial_path = out_dir / "results.partial.json"

    def save_partial() -> None:
        """What is measured so far (a killed run leaves it; the full results replace it at the end)."""
        order = ["1", "2", "3", "4", "5", "4g", "5g", "6", "7", "8", "9", "10"]
        out_dir.mkdir(parents=True, exist_ok=True)
        env.update(load_average_before=load_before, load_average_after=load_average())
        partial_path.write_text(json.dumps({
            "started_at": started, "wall_s": round(time.perf_counter() - t_start, 1), "quick": args.quick,
            "device": args.device, "partial": True,
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "environment": env, "rows": [rows[k] for k in order if k in rows]}, indent=2, default=_json_default) + "\n")

    # Order: the single-process rows first (no Ray daemons running beside them), then Ray.
    if "1" in wanted:
        from . import anchor_targets

        try:
            rows["1"] = anchor_targets.run(args.quick)
        except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
            rows["1"] = _failed("1", "anchor targets per image", exc)
        save_partial()

    if "10" in wanted:
        from . import coco_ingest_bench

        try:
            rows["10"] = coco_ingest_bench.run(args.quick)
        except Exception as exc:  # noqa: BLE001
            rows["10"] = _failed("10", "COCO instances ingest vs json.load", exc)
        save_partial()

    if wanted & {"4", "5"}:
        from . import detector

        try:
            # Headline at one torch thread: what a training worker runs with (run_training sets
            # torch threads = cpus_per_worker, 1 by default), and the only setting that is not
            # swamped by OpenMP stalls when other processes share the 2 cores. Then the default.
            res = detector.run(args.quick, "cpu", threads=1)
            rows["4"], rows["5"] = res["train"], res["infer"]
            default_threads = torch.get_num_threads()
            if default_threads != 1:
                alt = detector.run(args.quick, "cpu", threads=default_threads, rounds=1 if args.quick else 3)
                for key, rid in (("train", "4"), ("infer", "5")):
                    rows[rid]["data"][f"at_{default_threads}_threads"] = alt[key]["data"]
                    rows[rid]["auto_note"] += f"; at {default_threads} torch threads: {alt[key]['figure']}"
        except Exception as exc:  # noqa: BLE001
            rows["4"] = _failed("4", "training images/s vs torchvision", exc)
            rows["5"] = _failed("5", "inference images/s vs torchvision", exc)
        if args.device == "cuda" and torch.cuda.is_available():
            try:
                res = detector.run(args.quick, "cuda", amp=True)
                rows["4g"], rows["5g"] = res["train"], res["infer"]
            except Exception as exc:  # noqa: BLE001
                rows["4g"] = _failed("4g", "training images/s on the GPU vs torchvision", exc)
                rows["5g"] = _failed("5g", "inference images/s on the GPU vs torchvision", exc)
        save_partial()
    if not wanted & {"4", "5"}:
        pass
    elif not torch.cuda.is_available():
        for r in _gpu_rows(NO_GPU):
            rows[r["id"]] = r
    elif args.device != "cuda":
        for r in _gpu_rows("not measured (run with --device cuda)"):
            rows[r["id"]] = r

    train_images = 32 if args.quick else 64
    need = [train_images if wanted & {"6", "7"} else 0,
            (24 if args.quick else 200) * 10 if wanted & {"2", "3"} else 0,
            (64 if args.quick else 256) if wanted & {"8", "9"} else 0,
            (64 if args.quick else 600) if "9" in wanted else 0]
    with tempfile.TemporaryDirectory(prefix="frcnn-bench-") as tmp:
        work = Path(tmp)
        ws = Workspace(work, max(need + [1]))
        shards = None
        if wanted & {"2", "3"}:
            from . import precompute_bench

            try:
                res = precompute_bench.run(args.quick, ws, train_images)
                rows["2"], rows["3"] = res["throughput"], res["memory"]
                shards = res["train_shards"]
            except Exception as exc:  # noqa: BLE001
                rows["2"] = _failed("2", "precompute throughput", exc)
                rows["3"] = _failed("3", "precompute peak memory", exc)
            for rid in ("2", "3"):
                if rid not in wanted:
                    rows.pop(rid, None)
            save_partial()
        if wanted & {"6", "7"}:
            from . import training_bench

            try:
                if shards is None:
                    shards = ws.train_shards(train_images)
                res = training_bench.run(args.quick, shards, work / "train", train_images)
                rows["6"], rows["7"] = res["wait"], res["scaling"]
            except Exception as exc:  # noqa: BLE001
                rows["6"] = _failed("6", "data wait during training", exc)
                rows["7"] = _failed("7", "training from 1 to 2 workers", exc)
            for rid in ("6", "7"):
                if rid not in wanted:
                    rows.pop(rid, None)
            save_partial()
        checkpoint = None
        if "8" in wanted:
            from . import jobs_bench

            try:
                res = jobs_bench.run_train(args.quick, ws, work / "row8")
                rows["8"], checkpoint = res["row"], res["checkpoint"]
            except Exception as exc:  # noqa: BLE001
                rows["8"] = _failed("8", "frcnn-jobs train vs the bare training loop", exc)
            save_partial()
        if "9" in wanted:
            from . import jobs_bench

            try:
                rows["9"] = jobs_bench.run_infer(args.quick, ws, work / "row9", checkpoint)
            except Exception as exc:  # noqa: BLE001
                rows["9"] = _failed("9", "frcnn-jobs infer vs the model-only detect()", exc)

    wall = time.perf_counter() - t_start
    load_after = load_average()
    env.update(load_average_before=load_before, load_average_after=load_after)
    order = ["1", "2", "3", "4", "5", "4g", "5g", "6", "7", "8", "9", "10"]
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in rows.values():
        r.setdefault("run", {"started_at": started, "command": command.strip(), "load_average_before": load_before,
                             "git_commit": env["git_commit"]})
    result = {
        "started_at": started, "wall_s": round(wall, 1), "quick": args.quick, "device": args.device,
        "command": command, "environment": env,
    }
    if args.merge:
        old = json.loads((out_dir / "results.json").read_text())
        kept = {r["id"]: r for r in old["rows"] if r["id"] not in rows}
        for r in kept.values():
            r.setdefault("run", {"started_at": old["started_at"], "command": old["command"].strip(),
                                 "load_average_before": old["environment"].get("load_average_before"),
                                 "git_commit": old["environment"].get("git_commit")})
        rows = {**kept, **rows}
        merged = list(old.get("merged_runs", [])) + [{
            "started_at": started, "command": command.strip(), "rows": sorted(set(wanted) & set(rows)),
            "wall_s": round(wall, 1)}]
        result = {**old, "merged_runs": merged}
    result["rows"] = [rows[k] for k in order if k in rows]
    table = result["rows"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    (out_dir / "RESULTS.md").write_text(report.render(result))
    partial_path.unlink(missing_ok=True)
    say(f"done in {wall:.0f} s; load average {load_before} -> {load_after}; wrote {out_dir / 'results.json'} "
        f"and {out_dir / 'RESULTS.md'}")
    print()
    print(report.table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
