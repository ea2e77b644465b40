"""Tuning, for real (Ray Train, Ray Tune, MLflow): ``frcnn-jobs train --set ...`` with early
stopping, and a two-trial ``sweep`` that ASHA must cut short."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from frcnn import tiny_config
from frcnn.training import load_checkpoint
from pipelines.synth import SYNTH_CLASSES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session, synth_dataset):
    from pipelines.precompute import precompute

    root = tmp_path_factory.mktemp("early_stop_data")
    voc = str(synth_dataset(n_images=16, seed=5, min_size=90, max_size=140).root)
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=96)
    out = {}
    for split in ("train", "val"):
        out[split] = str(root / f"shards_{split}")
        precompute(voc, split, out[split], cfg, progress=False)
    return out


def test_set_reaches_params_and_checkpoint_and_early_stop_ends_the_run(shards, tmp_path, tracking_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.cli import main
    from jobs.models import CHECKPOINT_FILE

    monkeypatch.chdir(tmp_path)
    # score_thresh 1.0: no detection passes, so val mAP@0.5 is 0 at every validation: the first
    # one is the best, the second brings no gain and (patience 1) stops the run at epoch 2 of 6.
    args = ["train", "--data", shards["train"], "--val-data", shards["val"], "--workers", "1",
            "--storage-path", str(tmp_path / "ray"), "--model-name", "early", "--experiment", "early",
            "--progress-every", "0", "--epochs", "6",
            "--set", "model.roi.score_thresh=1.0", "--set", "train.early_stop_patience=1",
            "--set", "train.warmup_steps=1", "--set", "train.batch_size=2", "--set", "train.log_every=2"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert re.search(r"^stopped at epoch 2/6, early stop: val mAP@0\.5 did not improve for 1 validation\(s\) "
                     r"\(best 0\.0000 at epoch 1\)$", res.output, re.M), res.output

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["frcnn.stop_reason"] == "early_stop"
    assert run.data.tags["frcnn.best_epoch"] == "1"
    # The resolved config is what is logged: --set values and the shorthand alike.
    params = run.data.params
    assert params["model.roi.score_thresh"] == "1.0" and params["train.early_stop_patience"] == "1"
    assert params["train.epochs"] == "6" and params["train.batch_size"] == "2"
    # Two epochs ran, each checkpointed (the stopping epoch too); nothing after the stop.
    ckpts = sorted(p.name for p in (tmp_path / "ray").glob("train-*/epoch-*"))
    assert ckpts == ["epoch-0000", "epoch-0001"]
    # The registered version is the best checkpoint (epoch 1: the later ones brought no gain), and
    # it holds the resolved config.
    version = client.get_model_version("early", "1")
    assert version.run_id == run.info.run_id
    best = client.download_artifacts(run.info.run_id, f"checkpoints/best/{CHECKPOINT_FILE}", str(tmp_path / "dl"))
    state = load_checkpoint(best)
    assert state["epoch"] == 0
    assert state["model_config"]["roi"]["score_thresh"] == 1.0 and state["train_config"]["early_stop_patience"] == 1
    # Metric names grouped by prefix; the four loss keys keep their names inside train/ and val/.
    keys = set(run.data.metrics)
    assert {f"{p}{k}" for p in ("train/", "val/") for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_roi_cls",
                                                             "loss_roi_loc", "loss_total")} <= keys
    assert {"val/map50", "train/lr", "system/perf/images_per_s", "system/perf/data_wait_frac",
            "system/perf/epoch", "system/perf/rank_weight_diff"} <= keys
    assert all(k.startswith(("train/", "val/", "system/")) for k in keys), sorted(keys)
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/map50"))
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss_total"))
    assert len(val_steps) == 2 and 2 * val_steps[0] == val_steps[1] == last

