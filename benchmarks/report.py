"""``RESULTS.md`` from ``results.json``: the command that made it, the table of ratios, the
software versions, and for a row that misses its goal the profile the run took. What was found
about the rows that miss or nearly miss their goals is in docs/benchmarks.md."""

from __future__ import annotations

from typing import Any


def _met(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "**FAILED**"
    if row.get("met") is None:
        return "-"
    return "yes" if row["met"] else "**NO**"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _note(row: dict[str, Any]) -> str:
    parts = []
    if row.get("error"):
        parts.append("the measurement raised (traceback in results.json)")
    elif row.get("met") is False:
        parts.append(f"MISSED: see docs/benchmarks.md, row {row['id']}")
    if row.get("auto_note"):
        parts.append(row["auto_note"])
    return _cell("; ".join(parts))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| # | what | baseline | figure | goal | met? | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (r["id"], r["what"], r["baseline"], r["figure"], r["goal"],
                                                          _met(r))) + f" | {_note(r)} |")
    return "\n".join(lines)


def _profile_table(ops: list[dict[str, Any]]) -> str:
    lines = ["| op | input shapes | self ms / image | share | calls / image |", "|---|---|---|---|---|"]
    for o in ops:
        lines.append(f"| `{o['op']}` | `{_cell(o['shapes'])}` | {o['self_ms_per_image']:.3f} | {o['share']:.0%} "
                     f"| {o['calls_per_image']:g} |")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    env = result["environment"]
    v = env["versions"]
    rows = result["rows"]
    missed = [r for r in rows if not r.get("error") and r.get("met") is False]
    out = [
        "# Benchmarks",
        "",
        f"Made by `{result['command'].strip()}` (`make bench` runs them all)"
        f"{' at **quick** sizes' if result.get('quick') else ''}. "
        "Every figure is a ratio against a baseline measured in the same run, baseline and candidate "
        "interleaved, best of the rounds: absolute timings depend on the machine and its load, ratios much less. "
        "What was found about the rows that miss or nearly miss their goals: docs/benchmarks.md.",
        "",
        f"Software: torch {v['torch']}, torchvision {v['torchvision']}, ray {v['ray']}, mlflow {v['mlflow']}, "
        f"numpy {v['numpy']}, pillow {v['pillow']}, pyarrow {v['pyarrow']}, Python {env['python']}; "
        f"{env['cpu_count']} CPUs, GPU: {env['cuda_device'] or 'none'}.",
        "",
        table(rows),
        "",
    ]
    for r in missed:
        prof = (r.get("data") or {}).get("profile_20_boxes_1_thread")
        if prof:
            out += [f"## Row {r['id']}: where the time goes", "",
                    "torch.profiler, `assign_anchor_targets`, 20 boxes, one thread:", "", _profile_table(prof), ""]
    out += ["## How each row is measured", ""]
    for r in rows:
        d = r.get("data") or {}
        if "statistic" in d:
            out.append(f"- Row {r['id']}: {d['statistic']}; {d.get('rounds', '?')} rounds.")
    out += ["- Row 3: peak RSS of the driver plus every `ray::` worker process, sampled every 50 ms by a thread "
            "(psutil), in one run of N images and one of 10N (not the timed runs of row 2).",
            "- Rows 6/7: `jobs.train.run_training` with a temporary SQLite MLflow store; the figures are read back "
            "from the runs' `data_wait_frac` and `images_per_s` metrics.",
            "- Row 8: `jobs.train.run_training` (1 worker, 1 CPU, the demo config's schedule) timed by its own MLflow "
            "metric timestamps from the first to the last logged step (epoch boundaries and logging inside, "
            "start-up outside) against the bare training loop in the benchmark's process on the same decoded rows "
            "(`benchmarks/jobs_bench.py`).",
            "- Row 9: `pipelines.infer.run_inference` over a folder of JPEGs, wall time of the whole call with Ray "
            "already up and the predictor workers warm (the first, cold call after Ray's start is in the note), "
            "against `detect()` alone on pre-decoded canvases in the benchmark's process "
            "(`benchmarks/jobs_bench.py`).",
            "- Rows are registered in `benchmarks/rows.py`; `python -m benchmarks.run --list` lists them, "
            "`--only N` runs one. Raw samples and sizes: `benchmarks/results.json`.", ""]
    return "\n".join(out)
