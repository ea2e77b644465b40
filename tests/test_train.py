"""Ray Train + MLflow, for real: 2 CPU workers, tiny backbone, 128x128 canvas, generated data."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from frcnn import LOSS_KEYS, FasterRCNN, tiny_config
from frcnn.training import TrainConfig, load_checkpoint, model_from_checkpoint
from jobs.train_loop import StepContext, TrainCallback
from pipelines.synth import SYNTH_CLASSES

from .procs import frcnn_jobs, group_ends, interrupt_when, printed_resume

CANVAS = 128

pytestmark = pytest.mark.integration


class DieOnce(TrainCallback):
    """The last rank's process dies at ``step`` (``os._exit``, as an OOM kill would end it), once:
    the marker file lets the restarted group go past that step."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_step(self, ctx: StepContext) -> None:
        if ctx.rank == ctx.world_size - 1 and ctx.step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text(f"killed at step {ctx.step}\n")
            os._exit(1)


class PoisonWeights(TrainCallback):
    """After step ``after``, one weight becomes NaN on every rank: the next step's loss is NaN."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_step(self, ctx: StepContext) -> None:
        if ctx.step == self.after:
            with torch.no_grad():
                next(ctx.model.parameters()).view(-1)[0] = float("nan")


@pytest.fixture()
def callbacks_by_value(ray_session):
    """The callbacks above travel to the Ray workers by value: the workers cannot import this
    test module by name."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session, synth_dataset):
    from pipelines.precompute import precompute

    root = tmp_path_factory.mktemp("train_data")
    # 40 images: 28 train (7 steps an epoch at 2 workers x 2), 6 val.
    voc = str(synth_dataset(n_images=40, seed=3, min_size=120, max_size=200).root)
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=CANVAS)
    out = {}
    for split in ("train", "val"):
        out[split] = str(root / f"shards_{split}")
        precompute(voc, split, out[split], cfg, progress=False)
    return out


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own folder (what a run writes beside the command stays there)."""
    monkeypatch.chdir(tmp_path)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _losses_on_fixed_samples(model: FasterRCNN, images, targets, proposals) -> dict[str, float]:
    """The four losses on fixed inputs: the same anchor sample (the global RNG seeded alike) and the
    same RoIs for the head; BatchNorm on batch statistics, as in a training step."""
    torch.manual_seed(1234)
    model.train()
    with torch.no_grad():
        losses = model(images, targets, proposals)
    return {k: float(losses[k]) for k in LOSS_KEYS}


def _training_rows(path: str, cfg):
    from pipelines.precompute import open_precomputed
    from pipelines.schema import batch_to_tensors

    ds, _ = open_precomputed(path, cfg)
    rows = ds.take_all()
    return batch_to_tensors({k: [r[k] for r in rows] for k in rows[0]}, cfg.num_anchor_positions)


def test_train_with_worker_failure_then_resume(shards, tracking_uri, tmp_path, capsys, callbacks_by_value):
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.models import CHECKPOINT_FILE
    from jobs.train import run_training

    # 280 steps: the RoI head's box branch needs a few hundred steps to learn on fixed samples.
    tc = TrainConfig(epochs=40, batch_size=2, base_lr=0.04, lr_reference_batch=4, warmup_steps=4,
                     log_every=1, checkpoint_every=10, val_every=10, keep_checkpoints=2, max_failures=2,
                     schedule="cosine")
    marker = tmp_path / "killed-once"
    res = run_training(shards["train"], shards["val"], train_cfg=tc, workers=2, cpus_per_worker=1,
                       experiment="t", storage_path=str(tmp_path / "ray"), model_name="frcnn-test",
                       progress_every=3, callbacks=[DieOnce(75, str(marker))])  # first checkpoint: step 70
    assert marker.exists(), "the injected failure did not happen"
    # Progress lines while it trains, then the run id, checkpoint and final metrics.
    out = capsys.readouterr().out
    progress = re.findall(r"^train \S+: step (\d+)/280, epoch (\d+)/40, loss_total \d+\.\d+", out, re.M)
    assert progress and all(1 <= int(s) <= 280 for s, _ in progress), out
    assert f"MLflow run {res.run_id}" in out and f"checkpoint: {res.checkpoint_path}" in out
    assert "final metrics: " in out and "val_map50=" in out
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert [r.info.run_id for r in runs] == [res.run_id]  # the restart wrote into the same run
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-tiny-synth-2w"

    # Params: every resolved config value.
    params = run.data.params
    assert params["model.anchors.scales"] == "(2.0, 4.0, 8.0)"
    assert params["train.epochs"] == "40" and params["job.workers"] == "2" and params["job.effective_batch"] == "4"

    # Step history: every step logged once, although steps 71-75 were done twice.
    hist = _history(client, res.run_id, "train/loss_total")
    steps = [s for s, _ in hist]
    assert steps == list(range(1, 40 * 7 + 1))
    # The restarted group recorded where it picked up: the checkpoint of step 70, once.
    assert _history(client, res.run_id, "system/perf/resumed_from_step") == [(70, 70.0)]
    for key in ("train/loss_rpn_cls", "train/loss_rpn_loc", "train/loss_roi_cls", "train/loss_roi_loc", "train/lr",
                "system/perf/images_per_s", "system/perf/data_wait_frac", "val/map50", "val/loss_total"):
        assert client.get_metric_history(res.run_id, key), key

    # Training lowers every loss: the trained weights against the initial ones (train_loop seeds
    # them with train.seed) on the same training images, the same anchor sample and the same RoIs
    # (the trained RPN's proposals). This is the oracle for the RoI box loss, whose logged value
    # rises at first: early on the head's foreground RoIs are mostly the ground-truth boxes added
    # to the proposals (zero target), later the RPN's proposals with real offsets.
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=CANVAS)
    images, targets = _training_rows(shards["train"], cfg)
    trained = model_from_checkpoint(load_checkpoint(f"{res.checkpoint_path}/{CHECKPOINT_FILE}"))
    torch.manual_seed(tc.seed)
    initial = FasterRCNN(cfg)
    proposals = trained.train().propose(images)
    before = _losses_on_fixed_samples(initial, images, targets, proposals)
    after = _losses_on_fixed_samples(trained, images, targets, proposals)
    for key in LOSS_KEYS:
        assert after[key] < 0.9 * before[key], (key, before, after)
    # The logged histories of the other three fall too: mean over the second half of the steps
    # below the first half's (single 4-image steps are too noisy to compare one by one).
    for key in ("loss_rpn_cls", "loss_rpn_loc", "loss_roi_cls"):
        vals = [v for _, v in _history(client, res.run_id, f"train/{key}")]
        half = len(vals) // 2
        assert np.mean(vals[half:]) < np.mean(vals[:half]), (key, vals)

    # DDP kept the two replicas identical.
    assert res.metrics["rank_weight_diff"] == 0.0

    # Checkpoints as artifacts, and a registered version that loads (weights_only) and predicts.
    arts = {a.path for a in client.list_artifacts(res.run_id, "checkpoints")}
    assert arts == {"checkpoints/best", "checkpoints/final"}
    assert res.model_version == "1"
    model = mlflow.pyfunc.load_model("models:/frcnn-test/1")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (150, 100), (90, 120, 30)).save(buf, format="JPEG")
    pred = model.predict(__import__("pandas").DataFrame({"image": [buf.getvalue()]}))
    assert len(pred) == 1 and set(pred.columns) >= {"boxes", "scores", "labels", "class_names"}
    for box in pred.iloc[0]["boxes"]:
        assert 0 <= box[0] <= box[2] <= 150 and 0 <= box[1] <= box[3] <= 100
    # Its signature says what it takes, and a frame without the image column is refused by name.
    assert model.metadata.signature.inputs.input_names() == ["image"]
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['image'\]"):
        model.predict(__import__("pandas").DataFrame({"img": [buf.getvalue()]}))

    # --resume: continue the finished run for two more epochs, in the same MLflow run.
    res2 = run_training(shards["train"], shards["val"], train_cfg=TrainConfig(**{**tc.to_dict(), "epochs": 42}),
                        workers=2, cpus_per_worker=1, experiment="t", resume=res.run_id, model_name=None)
    assert res2.run_id == res.run_id
    steps2 = [s for s, _ in _history(client, res.run_id, "train/loss_total")]
    assert steps2 == list(range(1, 42 * 7 + 1))
    assert _history(client, res.run_id, "system/perf/resumed_from_step") == [(70, 70.0), (280, 280.0)]
    assert res2.metrics["epoch"] == 41


def test_nan_loss_stops_with_the_step(shards, tracking_uri, tmp_path, callbacks_by_value):
    from mlflow.tracking import MlflowClient

    from jobs.models import CHECKPOINT_FILE
    from jobs.train import NonFiniteLoss, run_training

    # 14 steps an epoch (28 rows, batch 2, 1 worker); the epoch-0 checkpoint holds step 14. The
    # weights turn NaN after step 17, so step 18's loss is NaN; losses are checked every 4 steps,
    # so the loop finds it at step 20 and must still name step 18.
    tc = TrainConfig(epochs=3, batch_size=2, log_every=4, warmup_steps=1)
    with pytest.raises(NonFiniteLoss, match=r"step 18; the last good checkpoint is (\S+)") as err:
        run_training(shards["train"], None, train_cfg=tc, workers=1, cpus_per_worker=1, experiment="nan",
                     storage_path=str(tmp_path / "ray"), model_name=None, callbacks=[PoisonWeights(17)])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["frcnn.nan_step"] == "18"
    # The last good checkpoint is kept (epoch 0, step 14, finite weights) and no later one was written.
    good = re.search(r"checkpoint is (\S+)$", str(err.value)).group(1)
    assert Path(good).name == "epoch-0000"
    state = load_checkpoint(f"{good}/{CHECKPOINT_FILE}")
    assert state["step"] == 14 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in Path(good).parent.glob("epoch-*")) == ["epoch-0000"]
    # Nothing computed after the NaN was logged: windows at steps 4, 8, 12 and 16, all finite.
    hist = _history(client, run.info.run_id, "train/loss_total")
    assert [s for s, _ in hist] == [4, 8, 12, 16] and all(np.isfinite(v) for _, v in hist)


def test_mismatched_config_is_refused(shards, tracking_uri, tmp_path):
    import yaml
    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.train import run_training
    from pipelines.schema import ManifestMismatch

    cfg = tiny_config(5, SYNTH_CLASSES, canvas=CANVAS + 32)
    with pytest.raises(ManifestMismatch, match="canvas_height"):
        run_training(shards["train"], model_cfg=cfg, train_cfg=TrainConfig(epochs=1), experiment="bad")

    # The CLI: every option parses, and the refusal is a one-line error with a non-zero exit.
    config = tmp_path / "bigger.yaml"
    config.write_text(yaml.safe_dump({"model": json.loads(json.dumps(cfg.to_dict())), "train": {"warmup_steps": 1}}))
    res = CliRunner().invoke(main, ["train", "--data", shards["train"], "--val-data", shards["val"], "--workers", "1",
                                    "--gpus-per-worker", "0", "--cpus-per-worker", "1", "--config", str(config),
                                    "--epochs", "1", "--batch-size", "2", "--lr", "0.01", "--experiment", "bad",
                                    "--model-name", "none", "--progress-every", "0"])
    assert res.exit_code == 1, res.output
    assert "canvas_height=128" in res.output and "canvas_height=160" in res.output, res.output


def test_progress_lines_come_from_the_mlflow_run(tracking_uri, capsys):
    import time

    import mlflow

    from jobs.progress import Progress

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("progress")  # not the experiment id an earlier test left active
    with mlflow.start_run() as run:
        with Progress(tracking_uri, run.info.run_id, total_steps=100, epochs=4, interval=0.05):
            time.sleep(0.3)  # nothing logged yet: no line
            mlflow.log_metrics({"train/loss_total": 1.5, "system/perf/epoch": 1, "system/perf/images_per_s": 12.0},
                               step=25)
            time.sleep(0.5)
            mlflow.log_metrics({"train/loss_total": 0.75, "system/perf/epoch": 2, "system/perf/images_per_s": 14.0,
                                "val/map50": 0.5}, step=60)
            time.sleep(0.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines  # one line per new step, not one per poll
    assert re.fullmatch(r"train \S+: step 25/100, epoch 2/4, loss_total 1\.500, 12\.0 images/s", lines[0])
    assert re.fullmatch(r"train \S+: step 60/100, epoch 3/4, loss_total 0\.750, 14\.0 images/s, "
                        r"val_map50 0\.500 \(step 60\), about \S+ left", lines[1])


def test_ctrl_c_stops_cleanly_marks_killed_and_resume_continues(shards, tracking_uri, tmp_path):
    """A real ``frcnn-jobs train`` process gets SIGINT (its whole process group, as a terminal's
    Ctrl-C): it stops, the run is KILLED, and the printed ``--resume`` command finishes the run with
    every step logged once."""
    from mlflow.tracking import MlflowClient

    from jobs.models import CHECKPOINT_FILE

    config = tmp_path / "train.yaml"
    config.write_text("train: {checkpoint_every: 1, log_every: 1, warmup_steps: 1, batch_size: 2}\n")
    storage = tmp_path / "ray"
    cmd = frcnn_jobs("train", "--data", shards["train"], "--workers", "1", "--config", str(config), "--epochs", "12",
                     "--experiment", "sigint", "--storage-path", str(storage), "--model-name", "sigint-test",
                     "--progress-every", "1")
    stopped = interrupt_when(cmd, lambda: bool(list(storage.glob("train-*/epoch-0001"))), cwd=tmp_path)
    out, err = stopped.out, stopped.err
    assert stopped.status == 130, (out, err)
    assert group_ends(stopped.pgid), subprocess.getoutput(f"pgrep -a -g {stopped.pgid}")  # Ray's processes too
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sigint").experiment_id])
    assert run.info.status == "KILLED" and run.info.run_name == "train-tiny-synth-1w"
    logged = max((s for s, _ in _history(client, run.info.run_id, "train/loss_total")), default=0)
    reached = int(re.search(r"reached step (\d+)/168;", err).group(1))
    ckpt = re.search(r"last checkpoint: (\S+)", err).group(1)
    assert re.fullmatch(r"epoch-\d{4}", Path(ckpt).name) and Path(ckpt).parent.parent == storage, err
    assert reached >= max(logged, load_checkpoint(f"{ckpt}/{CHECKPOINT_FILE}")["step"])
    assert f"MLflow run {run.info.run_id} is KILLED" in err, err
    resume = printed_resume(err)
    assert resume == ["frcnn-jobs", *cmd[1:], "--resume", run.info.run_id]
    # Quiet: our lines, not Ray's worker logs or Ray Data's operator stream.
    assert "PlacementGroupCleaner" not in out + err and "Execution plan" not in out + err, (out, err)
    assert all(line.startswith(("MLflow run", "train ")) for line in out.splitlines() if line.strip()), out

    done = subprocess.run(frcnn_jobs(*resume[1:]), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout, done.stderr)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss_total")] == list(range(1, 169))


def test_sigterm_stops_like_ctrl_c_and_a_second_attempt_is_refused_meanwhile(shards, tracking_uri, tmp_path):
    """SIGTERM to the driver alone (what Kubernetes, systemd or ``timeout`` send) is a stop request:
    exit status 143, the run KILLED, the ``--resume`` command printed. While the first attempt lives,
    ``--resume`` of the same run is refused with one line naming it, and the live run stays RUNNING."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "train.yaml"
    config.write_text("train: {checkpoint_every: 1, log_every: 1, warmup_steps: 1, batch_size: 2}\n")
    storage = tmp_path / "ray"
    exe = str(Path(sys.executable).parent / "frcnn-jobs")
    cmd = [exe, "train", "--data", shards["train"], "--workers", "1", "--config", str(config), "--epochs", "12",
           "--experiment", "sigterm", "--storage-path", str(storage), "--model-name", "sigterm-test",
           "--progress-every", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    client = MlflowClient(tracking_uri)
    try:
        deadline = time.monotonic() + 300
        while not list(storage.glob("train-*/epoch-0001")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        (run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
        again = subprocess.run([*cmd, "--resume", run.info.run_id], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
        [line] = [x for x in again.stderr.splitlines() if x.strip()]
        assert line.startswith(f"Error: train run {run.info.run_id}: in use by train (MLflow run "
                               f"{run.info.run_id}) started "), line
        assert client.get_run(run.info.run_id).info.status == "RUNNING" and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, (out, err)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert f"MLflow run {run.info.run_id} is KILLED" in err and "Traceback" not in err, err
    resume = printed_resume(err)
    assert resume == ["frcnn-jobs", *cmd[1:], "--resume", run.info.run_id]
    assert not (storage / "_staging").exists()  # the run's lease is released
