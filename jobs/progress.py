"""What the driver of a training job prints: progress lines read from the MLflow run (the quiet
default for Ray's own output is ``jobs/console.py``).

The progress lines come from the run (rank 0's latest metrics), not from the workers' stdout, so
they look the same on a laptop and on a cluster, whether or not Ray forwards worker output.
"""

from __future__ import annotations

import threading
import time


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
            if "train/loss_total" not in latest:
                continue
            loss, step = latest["train/loss_total"]
            if step == last_step:
                continue
            now = time.monotonic()
            first = first or (now, step)
            rate = (step - first[1]) / (now - first[0]) if now > first[0] else 0.0
            epoch = int(latest.get("system/perf/epoch", (0, 0))[0]) + 1
            parts = [f"train {duration(now - t0)}: step {step}/{self.total_steps}", f"epoch {epoch}/{self.epochs}",
                     f"loss_total {loss:.3f}"]
            if "system/perf/images_per_s" in latest:
                parts.append(f"{latest['system/perf/images_per_s'][0]:.1f} images/s")
            if "val/map50" in latest:
                parts.append(f"val_map50 {latest['val/map50'][0]:.3f} (step {latest['val/map50'][1]})")
            if rate > 0:
                parts.append(f"about {duration((self.total_steps - step) / rate)} left")
            print(", ".join(parts), flush=True)
            last_step = step
