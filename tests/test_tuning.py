"""Tuning, for real (Ray Train, Ray Tune, MLflow): ``frcnn-jobs train --set ...`` with early
stopping, and a two-trial ``sweep`` that ASHA must cut short."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from frcnn import tiny_config
from frcnn.training import load_checkpoint
from pipelines.synth import SYNTH_CLASSES

from .procs import frcnn_jobs, group_ends, interrupt_when

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


def test_sweep_parent_and_child_runs_one_stopped_early_best_registered(shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from frcnn.training import TrainConfig
    from jobs.sweep import Dimension, Scheduling, run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    # Two trials, in grid order, one at a time. The first (score_thresh 0) finds objects: its val
    # mAP@0.5 is above 0 and, first at every ASHA rung, it runs all 3 epochs. The second
    # (score_thresh 1: no detection passes) has mAP 0 at its first rung, below the first trial's:
    # ASHA (grace period 1) stops it there.
    dims = [Dimension.parse("model.roi.score_thresh=grid(0.0, 1.0)")]
    tc = TrainConfig(epochs=3, batch_size=2, warmup_steps=1, log_every=2, base_lr=0.02, lr_reference_batch=2)
    res = run_sweep(shards["train"], shards["val"], dims, train_cfg=tc, sched=Scheduling(trials=1, max_concurrent=1),
                    workers=1, experiment="sweep", storage_path=str(tmp_path / "ray"), model_name="sweep-best")

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep").experiment_id
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["frcnn.job"] == "sweep"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    by_value = {c.data.params["model.roi.score_thresh"]: c for c in children}
    assert sorted(by_value) == ["0.0", "1.0"], [c.data.params.get("model.roi.score_thresh") for c in children]
    good, bad = by_value["0.0"], by_value["1.0"]
    assert good.data.tags["frcnn.stopped_early"] == "false" and bad.data.tags["frcnn.stopped_early"] == "true"
    assert good.info.status == bad.info.status == "FINISHED"
    # Their params are the resolved configs, their curves their own.
    assert good.data.params["train.epochs"] == "3" and good.data.params["sweep.model.roi.score_thresh"] == "0.0"
    good_maps = [m.value for m in client.get_metric_history(good.info.run_id, "val/map50")]
    bad_maps = [m.value for m in client.get_metric_history(bad.info.run_id, "val/map50")]
    assert len(good_maps) == 3 and bad_maps and set(bad_maps) == {0.0}, (good_maps, bad_maps)
    # Tune stopped the second trial after the one epoch of its first rung. (Its workers do not wait
    # for Tune's decision, so on these tiny epochs its run may log another epoch or two first.)
    by_run = {t["run_id"]: t for t in res.trials}
    assert by_run[good.info.run_id]["epochs"] == 3 and by_run[bad.info.run_id]["epochs"] == 1, res.trials
    assert client.get_metric_history(bad.info.run_id, "train/loss_total")
    # The best trial's model is registered, from its own run.
    assert res.best_run_id == good.info.run_id and res.model_version == "1"
    assert client.get_model_version("sweep-best", "1").run_id == good.info.run_id
    assert parent.data.tags["frcnn.best_run_id"] == good.info.run_id
    assert [t["stopped_early"] for t in sorted(res.trials, key=lambda t: t["run_id"] != good.info.run_id)] == \
        [False, True]


@pytest.mark.parametrize(("sig", "group", "status"), [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_stops_every_trial_and_marks_the_runs_killed(shards, tracking_uri, tmp_path, sig, group,
                                                                   status):
    """A real ``frcnn-jobs sweep`` process gets SIGINT (its whole process group, as a terminal's
    Ctrl-C) or SIGTERM (the driver alone, as a scheduler sends it) while its first trial trains:
    it exits 130 or 143, the sweep run and every trial run that had started are KILLED (none left
    RUNNING), nothing is registered, and no process of it lives on."""
    from mlflow.tracking import MlflowClient

    cmd = frcnn_jobs("sweep", "--data", shards["train"], "--val-data", shards["val"], "--experiment", "sweep-int",
                     "--storage-path", str(tmp_path / "ray"), "--model-name", "sweep-int", "--epochs", "30",
                     "--trials", "1", "--search", "train.base_lr=grid(0.01, 0.02)", "--set", "train.batch_size=2",
                     "--set", "train.log_every=1", "--set", "train.warmup_steps=1")
    client = MlflowClient(tracking_uri)

    def first_trial_trains() -> bool:
        exp = client.get_experiment_by_name("sweep-int")
        runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`frcnn.job` = 'sweep-trial'")
        return any("train/loss_total" in r.data.metrics for r in runs)

    stopped = interrupt_when(cmd, first_trial_trains, cwd=tmp_path, sig=sig, group=group, wait_s=400)
    out, err = stopped.out, stopped.err
    assert stopped.status == status, (out, err)
    assert "interrupted: every trial is stopped" in err and "Traceback" not in err, err
    exp = client.get_experiment_by_name("sweep-int").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [r for r in runs if r.data.tags["frcnn.job"] == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED"
    assert trials and {r.info.status for r in trials} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in trials]
    assert client.search_registered_models("name = 'sweep-int'") == []
    # Ray's processes, started by the sweep, end with it.
    assert group_ends(stopped.pgid), subprocess.getoutput(f"pgrep -a -g {stopped.pgid}")


def test_placement_group_of_a_dead_actor_is_released_a_drivers_is_kept(ray_session):
    """What an ASHA stop leaves: an actor (a Ray Train controller) that made a placement group
    dies while the job lives on, and Ray keeps the group reserved. The sweep releases it; a group
    the driver made (Tune's own) stays."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from pipelines.runtime import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> str:
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg.id.hex()

    def state(pg_id: str) -> str:
        return placement_group_table()[pg_id]["state"]

    drivers = placement_group([{"CPU": 0.5}])
    ray.get(drivers.ready())
    controller = Controller.remote()
    orphan = ray.get(controller.reserve.remote())
    release_orphaned_placement_groups()
    assert state(orphan) == "CREATED"  # its creator lives
    ray.kill(controller)
    time.sleep(1)
    assert state(orphan) == "CREATED"  # Ray keeps it while the job lives
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and state(orphan) != "REMOVED":
        release_orphaned_placement_groups()
        time.sleep(0.5)
    assert state(orphan) == "REMOVED"
    assert state(drivers.id.hex()) == "CREATED"
    remove_placement_group(drivers)
