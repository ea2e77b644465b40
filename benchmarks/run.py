"""Run the benchmark suite and write ``results.json`` and ``RESULTS.md``.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--out DIR]     # `make bench`
    python -m benchmarks.run --only 8          # one row (or a list: --only 1,9), results in a temp folder

Rows (see ``RESULTS.md`` for the table and ``benchmarks/__init__.py`` for the modules):
1 anchor targets vs the walkthrough loop; 2 precompute vs the decode+resize+encode floor; 3 its
peak memory at N and 10N; 4 / 5 training / inference images/s vs torchvision's FasterRCNN; 6 data
wait during training; 7 one to two training workers; 8 `frcnn-jobs train` vs the bare training
loop; 9 `frcnn-jobs infer` vs the model-only detect(). ``--device cuda`` adds rows 4 and 5 on the
GPU with bf16 autocast. Every figure is a ratio measured in this run (interleaved rounds, best
of each): on a shared machine absolute timings mean little. The rows are registered in
``benchmarks/rows.py``; what was found for the rows that miss their goals is in docs/benchmarks.md.

A full run writes into ``benchmarks/``. ``--quick``
(smaller sizes, a smoke test) and ``--only`` write into a temporary folder unless ``--out`` is
given, so they never replace the committed results. Every row runs alone too: the synthetic
data it needs is generated for it (``benchmarks/workspace.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from .common import environment, say
from .rows import REGISTRY, Context, Row, all_ids
from .workspace import Workspace

HERE = Path(__file__).resolve().parent


def _failed(rid: str, exc: BaseException) -> dict[str, Any]:
    import traceback

    say(f"row {rid}: FAILED: {type(exc).__name__}: {exc}")
    return {"id": rid, "what": f"row {rid}", "baseline": "-",
            "figure": f"not measured: {type(exc).__name__}: {exc}"[:300], "goal": "-", "met": False,
            "value": None, "error": traceback.format_exc()[-4000:]}


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: also rows 4 and 5 on the GPU with bf16 autocast (default: cpu).")
    ap.add_argument("--quick", action="store_true", help="Smaller sizes: a smoke test of the whole suite.")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="Where results.json and RESULTS.md go (default: benchmarks/, or a temp folder with --quick).")
    ap.add_argument("--only", "--rows", dest="rows", default=None, metavar="LIST",
                    help="Comma-separated rows to run (default: all), e.g. --only 8 or --only 1,9; results go to a "
                         "temporary folder unless --out is given.")
    ap.add_argument("--list", action="store_true", help="List the registered rows and exit.")
    ap.add_argument("--render-only", action="store_true",
                    help="Only regenerate RESULTS.md from the results.json already in --out (no measurement).")
    ap.add_argument("--merge", action="store_true",
                    help="With --only: replace these rows in the results.json already in --out and keep the others.")
    args = ap.parse_args(argv)
    args.wanted = set(args.rows.split(",")) if args.rows else set(all_ids())
    unknown = args.wanted - set(all_ids())
    if unknown:
        ap.error(f"unknown row(s) {', '.join(sorted(unknown))}: rows are {', '.join(all_ids())}")
    args.partial = args.wanted != set(all_ids())
    return args


def _measure(entry: Row, ctx: Context, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """One registry entry's rows (those wanted); a failure fails its rows, not the run."""
    try:
        got = entry.measure(ctx)
    except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
        got = {rid: _failed(rid, exc) for rid in entry.ids}
    return {rid: r for rid, r in got.items() if rid in wanted}


def _write(out_dir: Path, result: dict[str, Any], name: str = "results.json") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(result, indent=2, default=_json_default) + "\n")


def _merge(out_dir: Path, result: dict[str, Any], rows: dict[str, dict]) -> dict[str, Any]:
    """The results.json in ``out_dir`` with these rows replaced."""
    old = json.loads((out_dir / "results.json").read_text())
    kept = {r["id"]: r for r in old["rows"] if r["id"] not in rows}
    for r in kept.values():
        r.setdefault("run", {"command": old["command"].strip()})
    return {**old, "rows": [r for rid in all_ids() for r in [{**kept, **rows}.get(rid)] if r]}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        for entry in REGISTRY:
            print(f"{','.join(entry.ids):10} {entry.name:15} goal {' / '.join(entry.goals):30} {entry.description}")
        return 0
    if args.render_only:
        target = Path(args.out) if args.out else HERE
        (target / "RESULTS.md").write_text(report.render(json.loads((target / "results.json").read_text())))
        print(f"wrote {target / 'RESULTS.md'} from {target / 'results.json'}")
        return 0
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="frcnn-bench-quick-" if args.quick else "frcnn-bench-rows-"))
        if args.quick or args.partial else HERE)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_start = time.perf_counter()
    env = environment()
    command = ("python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    say(f"start: {'quick' if args.quick else 'full'} run, device {args.device}, {env['cpu_count']} CPUs")
    entries = [e for e in REGISTRY if args.wanted & set(e.ids)]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="frcnn-bench-") as tmp:
        work = Path(tmp)
        images = max([e.images(args.quick) for e in entries] + [1])
        ctx = Context(args.quick, args.device, work, Workspace(work, images), train_images=32 if args.quick else 64)
        for entry in entries:
            rows.update(_measure(entry, ctx, args.wanted))
            _write(out_dir, {"command": command, "partial": True, "environment": env, "rows": list(rows.values())},
                   "results.partial.json")
    for r in rows.values():
        r.setdefault("run", {"command": command})
    result = {"wall_s": round(time.perf_counter() - t_start, 1), "quick": args.quick, "device": args.device,
              "command": command, "environment": env, "rows": [rows[i] for i in all_ids() if i in rows]}
    if args.merge:
        result = _merge(out_dir, result, rows)
    _write(out_dir, result)
    (out_dir / "RESULTS.md").write_text(report.render(result))
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    say(f"done; wrote {out_dir / 'results.json'} and {out_dir / 'RESULTS.md'}")
    print()
    print(report.table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
