"""Timing, memory sampling, environment capture and progress output shared by the rows."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_T0 = time.perf_counter()


def say(msg: str) -> None:
    """Progress line, with the seconds since the start of the run."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def ray_up(reserved_cpus: float = 0, attempts: int = 5) -> None:
    """Start local Ray the way the commands do (``pipelines.runtime.init_ray``), quietly, retrying:
    Ray gives its raylet a fixed 30 s to start, which an oversubscribed shared machine can miss
    ("The current node timed out during startup")."""
    import ray

    from pipelines.runtime import init_ray

    for attempt in range(1, attempts + 1):
        if ray.is_initialized():
            break
        try:
            init_ray(None, reserved_cpus, log_to_driver=False)
        except Exception as exc:  # Ray raises a bare Exception for this
            if attempt == attempts or "timed out" not in str(exc):
                raise
            say(f"ray: start {attempt} of {attempts} failed ({exc}); again")
            ray.shutdown()
            time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def mlflow_store(work: Path) -> Iterator[str]:
    """A temporary SQLite MLflow store in ``work`` (the tracking URI while inside), with the cwd
    moved there too: MLflow's default artifact root (./mlruns) lands in the temp folder."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    saved_cwd, saved_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(work)
    try:
        yield uri
    finally:
        os.chdir(saved_cwd)
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``repeat`` back-to-back calls."""
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Run each candidate once per round, alternating the order every round (ABBA...) so that a
    load change on the shared machine hits baseline and candidate alike. Each callable returns
    its own measurement (seconds, or a tuple of them). Returns every sample, per candidate."""
    names = list(candidates)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(candidates[n]())
    return out


def calibrate(fn: Callable[[], Any], target_s: float = 0.2, cap: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` (one sample)."""
    one = max(timed(fn), 1e-6)
    return int(max(1, min(cap, round(target_s / one))))


class PeakRSS:
    """Peak resident memory of this (driver) process plus every Ray worker process under it,
    sampled in a thread every ``interval`` s.

    Ray workers are the descendants whose command line starts with ``ray::`` (task workers, idle
    workers, actors such as the precompute ledger). ``peak_all`` also counts Ray's own daemons
    (raylet, GCS, dashboard agents), for information. Other children (a multiprocessing pool) are
    not counted. Shared pages (the object store) count in every process that maps them, as RSS
    does.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.root = psutil.Process()
        self.peak_workers = 0  # driver + ray:: workers
        self.peak_all = 0  # driver + every descendant
        self.samples = 0
        self.max_workers_seen = 0
        self._kind: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _kind_of(self, p) -> str | None:
        """"worker" (``ray::...``), "daemon" (Ray's own processes) or None (not Ray's)."""
        key = p.pid
        if key not in self._kind:
            try:
                cmd = p.cmdline()
            except self._psutil.Error:
                return None
            if cmd and cmd[0].startswith("ray::"):
                self._kind[key] = "worker"
            elif any("/ray/" in part for part in cmd[:3]):
                self._kind[key] = "daemon"
            else:
                self._kind[key] = None
        return self._kind[key]

    def sample(self) -> None:
        ps = self._psutil
        try:
            driver = self.root.memory_info().rss
            kids = self.root.children(recursive=True)
        except ps.Error:
            return
        workers = everything = 0
        n_workers = 0
        for p in kids:
            kind = self._kind_of(p)
            if kind is None:
                continue
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            everything += rss
            if kind == "worker":
                workers += rss
                n_workers += 1
        self.peak_workers = max(self.peak_workers, driver + workers)
        self.peak_all = max(self.peak_all, driver + everything)
        self.max_workers_seen = max(self.max_workers_seen, n_workers)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _version(mod: str) -> str | None:
    try:
        import importlib.metadata

        return importlib.metadata.version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return None


def environment() -> dict[str, Any]:
    """What the figures depend on: machine, load, threads, versions, code revision."""
    import torch

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        mem_gib = None
    status = _git("status", "--porcelain", "--", "frcnn", "pipelines", "jobs")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("torch", "torchvision", "ray", "mlflow", "numpy", "pillow",
                                              "pyarrow", "psutil", "frcnn-jobs")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_code": bool(status) if status is not None else None,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
