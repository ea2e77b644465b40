"""What the driver of a training job prints: progress lines read from the MLflow run, and the
quiet default for Ray's own output.

The progress lines come from the run (rank 0's latest metrics), not from the workers' stdout, so
they look the same on a laptop and on a cluster, whether or not Ray forwards worker output.
"""

from __future__ import annotations

import logging
import sys
import threading
import time


def verbose() -> bool:
    """``frcnn-jobs -v`` (debug logging on the root logger): show Ray's own detail too."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_ray(detail: bool = False) -> None:
    """Keep Ray Data's execution stream off a run's output; ``detail`` (``-v``) keeps everything.

    Ray Data prints each execution plan and, without a terminal, logs its progress bars as lines
    (hundreds in one training); in a terminal its bars stay. The workers' own output (including
    Ray Train's repeated ``PlacementGroupCleaner`` warnings, which come from an actor) is kept off
    by starting Ray with ``log_to_driver=False``: see ``run_training``.
    """
    if detail:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def duration(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Prints where a training is, every ``interval`` seconds, from the latest metrics rank 0 wrote
    to the MLflow run. One line per new step, none before the first logged step.

        train 2m00s: step 400/1586, epoch 7/26, loss_total 0.747, 34.2 images/s, about 4m41s left
    """

    def __init__(self, uri: str, run_id: str, total_steps: int, epochs: int, interval: float = 30.0) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id
        self.total_steps, self.epochs, self.interval = total_steps, epochs, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def __enter__(self) -> Progress:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        t0, first, last_step = time.monotonic(), None, None
        while not self._stop.wait(self.interval):
            try:
                latest = {m.key: (m.value, m.step) for m in self.client.get_run(self.run_id).data.to_proto().metrics}
            except Exception:  # noqa: BLE001 - a tracking server that does not answer: no line this time
                continue
            if "loss_total" not in latest:
                continue
            loss, step = latest["loss_total"]
            if step == last_step:
                continue
            now = time.monotonic()
            first = first or (now, step)
            rate = (step - first[1]) / (now - first[0]) if now > first[0] else 0.0
            parts = [f"train {duration(now - t0)}: step {step}/{self.total_steps}",
                     f"epoch {int(latest.get('epoch', (0, 0))[0]) + 1}/{self.epochs}", f"loss_total {loss:.3f}"]
            if "images_per_s" in latest:
                parts.append(f"{latest['images_per_s'][0]:.1f} images/s")
            if "val_map50" in latest:
                parts.append(f"val_map50 {latest['val_map50'][0]:.3f} (step {latest['val_map50'][1]})")
            if rate > 0:
                parts.append(f"about {duration((self.total_steps - step) / rate)} left")
            print(", ".join(parts), flush=True)
            last_step = step
