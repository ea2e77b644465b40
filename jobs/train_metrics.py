"""What rank 0 writes to MLflow during training: the metric names, grouped by prefix, and the
writer that logs them in step order without logging a step twice after a restart; CPU, memory and
GPU of rank 0's node into the same run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import tracking

log = logging.getLogger(__name__)


# MLflow metric names, grouped by prefix: the UI shows one section per prefix, sections and charts
# in alphabetical order, and "system/" ones on the System metrics tab. So the Model metrics tab
# opens on the training losses (train/), then validation (val/: its losses and map50), and
# throughput and progress (system/perf/) sit beside CPU and memory. Each metric's latest value,
# the run's summary, is on the run's Overview tab.
TRAIN, VAL, PERF = "train/", "val/", "system/perf/"


def train_metrics(window: dict[str, float], lr: float, epoch: int) -> dict[str, float]:
    """A logging window's values under their MLflow names: ``train/loss_total``, ``train/lr``,
    ``system/perf/images_per_s``, ``system/perf/epoch``, ..."""
    perf = ("images_per_s", "data_wait_frac")
    out = {TRAIN + k: v for k, v in window.items() if k not in perf}
    out.update({PERF + k: window[k] for k in perf if k in window})
    return {**out, TRAIN + "lr": lr, PERF + "epoch": epoch}


def val_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A validation's values under their MLflow names: ``val_map50`` -> ``val/map50``, ..."""
    return {VAL + k[len("val_"):]: v for k, v in metrics.items() if k.startswith("val_")}


class RankZeroMetrics:
    """MLflow metrics from rank 0, by run id, through ``tracking.MetricBuffer``: a step only
    enqueues, a background thread writes, and a tracking server outage buffers instead of stopping
    the training.

    Steps at or below the last one already in the run (per ``key``) are not logged again: after a
    restart the group redoes the steps after the last checkpoint. The buffer writes in step order,
    so what a killed rank 0 did not write is a tail of steps, which the restarted group logs.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.buffer = tracking.MetricBuffer(run_id, tracking_uri)
        self.run_id = run_id
        self._last: dict[str, int] = {}

    def last_step(self, key: str) -> int:
        if key not in self._last:
            history = tracking.safe(self.buffer.client.get_metric_history, self.run_id, key) or []
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def log(self, metrics: dict[str, float], step: int, key: str) -> None:
        if step > self.last_step(key):
            self.buffer.log(metrics, step)
            self._last[key] = step

    def flush(self) -> None:
        self.buffer.flush()

    def close(self) -> None:
        self.buffer.close()


def start_system_metrics(tracking_uri: str, run_id: str):
    """CPU, memory (and GPU, where pynvml is present) of rank 0's node, into the same run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are optional (psutil missing, ...)
        log.warning("system metrics disabled: %s", exc)
        return None
