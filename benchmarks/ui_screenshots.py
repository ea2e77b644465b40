"""The MLflow UI screenshots in docs/, taken in headless Chromium from real runs:

    python -m benchmarks.ui_screenshots --workdir /tmp/frcnn-shots

generates shapes, precomputes them, trains the tiny detector (one run) and sweeps two settings of
it (a parent run and its trials) into ``<workdir>/mlflow.db``, starts ``frcnn-jobs ui`` on it and
writes ``docs/mlflow-ui-train-run-metrics.png`` (the training run's Model metrics tab) and
``docs/mlflow-ui-sweep-trials.png`` (the sweep's parent run expanded in the experiment's chart
view, the trials' val mAP@0.5 side by side), both in MLflow's "Model training" mode. Needs
``chromium`` (Debian's package); ``benchmarks/cdp.py`` drives it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _cli(*args: str, env: dict) -> str:
    exe = str(Path(sys.executable).parent / "frcnn-jobs")
    done = subprocess.run([exe, *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def make_runs(work: Path, env: dict) -> None:
    data, shards = work / "synth", work / "shards"
    _cli("synth", "--out", str(data), "--images", "120", env=env)
    for split in ("train", "val"):
        _cli("precompute", "--data-root", str(data), "--split", split, "--out", str(shards / split), env=env)
    common = ["--data", str(shards / "train"), "--val-data", str(shards / "val"), "--experiment", "frcnn-ui",
              "--storage-path", str(work / "ray"), "--set", "train.batch_size=4", "--set", "train.log_every=2",
              "--set", "train.warmup_steps=5"]
    _cli("train", *common, "--epochs", "8", "--progress-every", "0", "--model-name", "frcnn-ui", env=env)
    _cli("sweep", *common, "--epochs", "4", "--trials", "1", "--model-name", "frcnn-ui-sweep",
         "--search", "train.base_lr=grid(0.005, 0.04)", env=env)


def serve(work: Path, port: int, env: dict) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "frcnn-jobs")
    proc = subprocess.Popen([exe, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("the MLflow UI did not start")


def take(work: Path, port: int) -> None:
    """Both pictures, in MLflow's "Model training" mode (no assistant panel)."""
    import urllib.parse

    from mlflow.tracking import MlflowClient

    from .cdp import drive

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("frcnn-ui")
    (train,) = client.search_runs([exp.experiment_id], "tags.`frcnn.job` = 'train'")
    base = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}"
    training_mode = "b.innerText.trim() === 'Model training'"

    async def train_run(page) -> None:
        await page.open(f"{base}/runs", settle_s=15)
        await page.click(training_mode)  # the mode switch opens the runs list: then go to the run
        await page.js(f"location.hash = '#/experiments/{exp.experiment_id}/runs/{train.info.run_id}/model-metrics'")
        await asyncio.sleep(15)
        await page.click("b.getAttribute('aria-label') === 'Close'", required=False, settle_s=15)  # the assistant
        await page.screenshot(DOCS / "mlflow-ui-train-run-metrics.png")

    async def sweep(page) -> None:
        # The sweep's parent run expanded to show its trials, in the chart view, charts searched to mAP.
        query = urllib.parse.quote("tags.`frcnn.job` LIKE 'sweep%'")
        await page.open(f"{base}/runs?searchFilter={query}", settle_s=15)
        await page.click(training_mode)
        await page.click("(b.getAttribute('data-component-id') || '').includes('runnamecellrenderer')")
        await page.js("location.hash = location.hash + '&compareRunsMode=CHART'")
        await asyncio.sleep(10)
        await page.click("b.getAttribute('aria-label') === 'Close'", required=False)  # the assistant
        await page.type_into('input[placeholder="Search metric charts"]', "map50", settle_s=20)
        await page.screenshot(DOCS / "mlflow-ui-sweep-trials.png")

    drive((1600, 2000), train_run)  # tall enough for the val section's map50 chart
    drive((1600, 900), sweep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--reuse", action="store_true", help="Screenshots only, of the runs already in --workdir.")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # On a small, loaded machine a trial's Ray Train worker can wait longer than Ray's default 60 s
    # for the CPU the previous trial frees; the timeout then hangs the sweep.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", **os.environ,
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    if not args.reuse:
        make_runs(work, env)
    proc = serve(work, args.port, env)
    try:
        take(work, args.port)
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
