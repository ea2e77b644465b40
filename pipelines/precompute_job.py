"""Precompute, the Ray side: the map function over a block of split entries, the problem ledger
actor and the driver's progress lines.

One task per shard
------------------
The split becomes ``ray.data.from_items(entries)`` cut into one block per shard, and
``map_batches(precompute_block, batch_size=None)`` fuses with ``write_parquet``: one task reads,
processes and writes one shard, and rows never travel through the object store. The function is a
generator that yields a small table every ``ROWS_PER_TABLE`` images, so a task holds a few images'
rows at a time, not the shard's.

How problems travel
-------------------
The map emits *only good rows*; every problem (skipped image, per-object warning, objects of
classes the model does not have) and the block's anchor-coverage counts
(``frcnn.anchor_coverage.CoverageStats``, merged by the driver) go to a small ``_Ledger`` actor,
in one awaited call per block (so nothing is in flight when the write returns). A column would
have to be filtered out before the write and aggregated after it: Ray Data cannot tee a stream, so
that is a second pass over the rows. The ledger de-duplicates records, so a retried task does not
report a file twice. It carries the stop signal for ``on_error="fail"`` (the task that meets the
first problem records it there before raising; the driver re-raises it as ``"<file>: <reason>"``)
and a progress counter that the tasks bump without waiting (about once a second) and the driver
polls for its progress lines.
One ledger serves all the runs of a driver (a named actor): an actor start is a process start.
"""

from __future__ import annotations

import collections
import operator
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from frcnn.errors import JobError
from pipelines.precompute_rows import get_worker, rows_to_table

__all__ = ["PrecomputeError", "Progress", "get_ledger", "precompute_block"]

ROWS_PER_TABLE = 8  # images per yielded table: a few MB of rows at an 800x800 canvas
_TICK_S = 1.0  # how often a task reports its progress count (fire and forget)


class PrecomputeError(JobError, RuntimeError):
    """The run stopped (``on_error="fail"``) or could not produce any output."""

    def __init__(self, message: str, source: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.source, self.reason))


def precompute_block(batch: pa.Table, *, spec: dict[str, Any], ledger: Any, run_id: str,
                     fail_fast: bool) -> Iterator[pa.Table]:
    """The ``map_batches`` function: one block of split entries in, good rows out (a table every
    ``ROWS_PER_TABLE`` images), problems and counts to the ledger once, at the end."""
    import ray

    from frcnn.anchor_coverage import CoverageStats

    worker = get_worker(spec)
    coverage = CoverageStats.empty(worker.cfg.rpn.neg_iou, worker.cfg.rpn.pos_iou)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    left_out: collections.Counter[str] = collections.Counter()
    written = positives = ticked = 0
    yielded = False
    last_tick = time.monotonic()
    items = batch.to_pylist()
    for n, item in enumerate(items, 1):
        result = worker.process(item)
        if result.fatal and fail_fast:
            rec = result.fatal[0]
            ray.get(ledger.fatal.remote(run_id, rec))
            raise PrecomputeError(f"{rec['source']}: {rec['reason']}", rec["source"], rec["reason"])
        skipped += result.skipped
        warnings += result.warnings
        left_out.update(result.left_out)
        if result.row is not None:
            rows.append(result.row)
            written += 1
            positives += result.positives
            coverage.add(result.fit.best_iou, result.fit.areas, result.fit.canvas_boxes)
        if time.monotonic() - last_tick >= _TICK_S:
            ledger.tick.remote(run_id, n - ticked)
            ticked, last_tick = n, time.monotonic()
        if len(rows) >= ROWS_PER_TABLE:
            yield rows_to_table(rows)
            rows, yielded = [], True
    ray.get(ledger.report.remote(run_id, len(items), written, positives, skipped, warnings,
                                 dict(left_out), len(items) - ticked, coverage.to_dict()))
    if rows or not yielded:
        yield rows_to_table(rows)


class _Ledger:
    """Problem records and counters, per run id (a Ray actor; see the module docstring).

    A run's state is dropped when the driver collects it (``finish``); reports of a finished run
    (a straggler task of a failed run) are not kept.
    """

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.closed: collections.deque[str] = collections.deque(maxlen=1000)

    def _run(self, run_id: str) -> dict[str, Any]:
        if run_id in self.closed:
            return _new_run()
        return self.runs.setdefault(run_id, _new_run())

    def tick(self, run_id: str, images: int) -> None:
        self._run(run_id)["ticked"] += images

    def progress(self, run_id: str) -> int:
        return self.runs[run_id]["ticked"] if run_id in self.runs else 0

    def report(self, run_id: str, processed: int, written: int, positives: int, skipped: list,
               warnings: list, left_out: dict[str, int], ticks: int, coverage: dict | None = None) -> None:
        run = self._run(run_id)
        if coverage is not None:  # the block's anchor-coverage counts; the driver merges them
            run["coverage"].append(coverage)
        run["processed"] += processed
        run["written"] += written
        run["positives"] += positives
        run["ticked"] += ticks
        for name, count in left_out.items():
            run["left_out"][name] = run["left_out"].get(name, 0) + count
        for name, records in (("skipped", skipped), ("warnings", warnings)):
            for r in records:  # keyed: a retried task does not report a file twice
                run[name].setdefault((r["image_id"], r["source"], r["reason"]), r)

    def fatal(self, run_id: str, record: dict[str, str]) -> None:
        run = self._run(run_id)
        if run["first_fatal"] is None:
            run["first_fatal"] = record

    def finish(self, run_id: str) -> dict[str, Any]:
        run = self.runs.pop(run_id, None) or _new_run()
        self.closed.append(run_id)
        key = operator.itemgetter("source", "reason")  # stable, readable manifest order
        run["skipped"] = sorted(run["skipped"].values(), key=key)
        run["warnings"] = sorted(run["warnings"].values(), key=key)
        run["left_out"] = dict(sorted(run["left_out"].items()))
        return run


def _new_run() -> dict[str, Any]:
    return {"processed": 0, "written": 0, "positives": 0, "ticked": 0, "skipped": {}, "warnings": {},
            "left_out": {}, "first_fatal": None, "coverage": []}


_LEDGER: dict[tuple[str, str], Any] = {}


def get_ledger():
    """The driver's ledger actor, reused across runs. The handle is kept here: a named actor with
    no handle left is garbage-collected, and a run starting at that moment met a dead actor."""
    import ray

    ctx = ray.get_runtime_context()
    key = (str(ctx.gcs_address), ctx.get_job_id())
    if key not in _LEDGER:
        _LEDGER.clear()
        _LEDGER[key] = ray.remote(_Ledger).options(
            name="frcnn-precompute-ledger", get_if_exists=True, num_cpus=0).remote()
    return _LEDGER[key]


class Progress:
    """The driver's progress lines, polled from the ledger: every 10 s without a terminal, every
    2 s with one (``interval`` overrides). ``precompute: 480/2000 images, 61.3 images/s, 25s``."""

    def __init__(self, ledger: Any, run_id: str, total: int, interval: float | None = None) -> None:
        self.ledger, self.run_id, self.total = ledger, run_id, total
        self.interval = interval if interval is not None else (2.0 if sys.stdout.isatty() else 10.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="precompute-progress", daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self.interval):
            try:
                done = ray.get(self.ledger.progress.remote(self.run_id), timeout=5)
            except Exception:  # noqa: BLE001 - a slow or missed poll costs the count, never the run
                seconds = time.perf_counter() - self._t0
                print(f"precompute: no count from the workers yet ({self.total} images to do), {seconds:.0f}s",
                      flush=True)
                continue
            # A line every interval, also before the first image is done (workers still starting).
            seconds = time.perf_counter() - self._t0
            print(f"precompute: {done}/{self.total} images, {done / seconds:.1f} images/s, {seconds:.0f}s",
                  flush=True)
