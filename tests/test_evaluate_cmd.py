"""``frcnn-jobs evaluate`` / ``promote`` / ``ui``: real Ray (inference), real MLflow (a tmp sqlite store).

The model is never trained here: an initialised tiny detector is saved as a checkpoint, so the
test checks the plumbing (runs, tags, metrics, artifacts, registry), not the numbers. The numbers
are checked with hand-built detections files, whose AP follows from counting. Ray comes from the
session fixture ``ray_session`` of ``tests/conftest.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from frcnn import FasterRCNN, tiny_config
from frcnn.training import TrainConfig, checkpoint_state
from jobs.evaluate import EvaluationError, run_evaluation
from jobs.models import PromotionError, parse_registry_ref, promote
from jobs.ui import ui_command
from pipelines.groundtruth import load_ground_truth
from pipelines.synth import SYNTH_CLASSES, generate

pytestmark = pytest.mark.integration

ARTIFACTS = {"per_class.csv", "pr_curves.png", "detections_grid.png", "detections.parquet"}


@pytest.fixture(scope="module")
def synth(synth_dataset) -> str:
    return str(synth_dataset(n_images=20, seed=0, min_size=96, max_size=200).root)


def _checkpoint(path, class_names=SYNTH_CLASSES) -> str:
    cfg = tiny_config(num_classes=5, class_names=tuple(class_names), canvas=128)
    torch.manual_seed(0)
    model = FasterRCNN(cfg)
    torch.save(checkpoint_state(model, None, 0, 0, cfg, TrainConfig()), path)
    return str(path)


def _write_dets(path, rows) -> str:
    pq.write_table(pa.table({
        "image_id": pa.array([r[0] for r in rows], pa.string()),
        "boxes": pa.array([np.asarray(r[1], np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "scores": pa.array([np.ones(len(r[2]), np.float32) for r in rows], pa.list_(pa.float32())),
        "labels": pa.array([np.asarray(r[2], np.int32) for r in rows], pa.list_(pa.int32())),
    }), path)
    return str(path)


# --------------------------------------------------------------------------- evaluate a model


def test_evaluate_checkpoint_logs_a_tagged_run_with_artifacts(ray_session, synth, tracking_uri, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    res = run_evaluation(ckpt, data_root=synth, split="test", experiment="eval-test", batch_size=2)
    client = MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"evaluate-{tmp_path.name}-test"
    tags = run.data.tags
    assert tags["frcnn.job"] == "evaluate" and tags["frcnn.dataset"] == "voc" and tags["frcnn.split"] == "test"
    assert tags["frcnn.model_uri"] == ckpt and tags["frcnn.data_root"] == synth
    assert "mlflow.parentRunId" not in tags
    m = run.data.metrics
    assert 0.0 <= m["map50"] <= 1.0 and math.isfinite(m["map50_voc07"]) and "coco_map" in m
    assert m["images"] == len(load_ground_truth(synth, "test")) and m["images_with_errors"] == 0
    assert m["images_per_s"] > 0
    assert [r["class"] for r in res.per_class] == list(SYNTH_CLASSES)
    assert {a.path for a in client.list_artifacts(res.run_id)} >= ARTIFACTS
    local = client.download_artifacts(res.run_id, "per_class.csv", str(tmp_path))
    assert open(local).readline().strip() == "class,num_gt,num_det,ap_voc,ap_voc07"
    out = capsys.readouterr().out
    assert res.run_id in out and "map50=" in out and "ellipse" in out


def test_cli_ctrl_c_while_predicting_kills_the_run_and_says_what_to_rerun(ray_session, tracking_uri, tmp_path):
    """Ctrl-C (SIGINT to the real ``frcnn-jobs evaluate`` process) while it predicts (after its
    first progress line): exit 130, the run KILLED with no metrics or artifacts, and the exact
    command to rerun. (A Ctrl-C during Ray's own start is ignored: the daemons it spawns must
    start with SIGINT ignored, see ``pipelines.runtime.init_ray``.)"""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import ray
    from mlflow.tracking import MlflowClient

    root = tmp_path / "voc"
    generate(root, n_images=1200, min_size=96, max_size=200)  # trainval: 1,020 images, ~20 s to predict
    ckpt = _checkpoint(tmp_path / "model.pt")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": tracking_uri}
    exe = Path(sys.executable).with_name("frcnn-jobs")
    cmd = [str(exe), "evaluate", "--model", ckpt, "--data-root", str(root), "--split", "trainval",
           "--batch-size", "2", "--experiment", "ctrl-c"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not any(line.startswith("predict ") for line in seen):  # "predict 10s: 420/1020 images, ..."
            assert proc.poll() is None or not lines.empty(), "".join(seen)
            seen.append(lines.get(timeout=120))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    text = "".join(seen)
    assert proc.returncode == 130, text
    assert "interrupted: the evaluation run is KILLED, no metrics or version tags were recorded" in text, text
    assert f"rerun: frcnn-jobs evaluate --model {ckpt} --data-root {root} --split trainval" in text, text
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    assert run.info.status == "KILLED", run.info
    assert "map50" not in run.data.metrics and not client.list_artifacts(run.info.run_id)


def test_evaluate_refuses_a_model_of_other_classes(synth, tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    ckpt = _checkpoint(tmp_path / "other.pt", class_names=("a", "b", "c", "d", "e"))
    with pytest.raises(EvaluationError, match="model class.*'a', 'b', 'c', 'd', 'e' not in the dataset"):
        run_evaluation(ckpt, data_root=synth, split="test", experiment="eval-test")
    exp = MlflowClient(tracking_uri).get_experiment_by_name("eval-test")
    assert not MlflowClient(tracking_uri).search_runs([exp.experiment_id])  # refused before any run


def test_evaluate_registered_version_tags_run_and_registry(synth, tracking_uri, tmp_path, monkeypatch):
    """A registry reference is resolved once (alias -> version), recorded in the run's tags, and the
    version gets the numbers as tags. Inference is replaced by perfect detections (no Ray here)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import jobs.evaluate as ev
    from jobs import tracking
    from jobs.models import register_model

    tracking.setup(tracking_uri, "registry-test")
    with mlflow.start_run() as train_run:
        assert register_model(_checkpoint(tmp_path / "checkpoint.pt"), "frcnn") == "1"
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("frcnn", "champion", "1")

    def perfect(gt, checkpoint, data_root, **kwargs):
        assert checkpoint[:2] == b"PK"  # the checkpoint file's bytes (torch.save writes a zip)
        return _perfect(gt), set(), {"images_per_s": 1.0}

    monkeypatch.setattr(ev, "predict_split", perfect)
    res = run_evaluation("models:/frcnn@champion", data_root=synth, split="test", experiment="eval-test",
                         verbose=False)
    run = client.get_run(res.run_id)
    assert run.info.run_name == "evaluate-frcnn@champion-test"
    tags = run.data.tags
    assert tags["frcnn.model_uri"] == "models:/frcnn@champion"
    assert (tags["frcnn.model_name"], tags["frcnn.model_version"]) == ("frcnn", "1")
    assert tags["frcnn.train_run_id"] == train_run.info.run_id
    vtags = client.get_model_version("frcnn", "1").tags
    assert vtags["map50_test"] == "1.0000" and vtags["eval_run_test"] == res.run_id
    assert "map50_voc07_test" in vtags and "coco_map_test" in vtags


def _perfect(gt) -> dict:
    return {i: {"boxes": g["boxes"], "scores": np.ones(len(g["labels"]), np.float32), "labels": g["labels"]}
            for i, g in gt.boxes.items()}


def test_a_model_of_some_of_the_classes_is_scored_on_them(synth, tracking_uri, tmp_path, monkeypatch):
    """A model trained on two of the five classes, in its own order: its labels are its classes,
    ground truth of the other three is left out of the scoring and counted."""
    import xml.etree.ElementTree as ET  # the generated XML, parsed here as an independent count

    import jobs.evaluate as ev

    model_classes = ("cross", "ellipse")
    ckpt = tmp_path / "two.pt"
    cfg = tiny_config(num_classes=2, class_names=model_classes, canvas=128)
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), ckpt)
    seen = {}

    def perfect(gt, checkpoint, data_root, **kwargs):
        seen["gt"] = gt
        return _perfect(gt), set(), {"images_per_s": 1.0}

    monkeypatch.setattr(ev, "predict_split", perfect)
    res = run_evaluation(str(ckpt), data_root=synth, split="test", experiment="eval-test", verbose=False)
    assert [r["class"] for r in res.per_class] == list(model_classes)
    gt = seen["gt"]
    names = {}
    for image_id in gt.image_ids:
        root = ET.parse(f"{synth}/VOCdevkit/VOC2007/Annotations/{image_id}.xml").getroot()
        for obj in root.findall("object"):
            names[obj.findtext("name")] = names.get(obj.findtext("name"), 0) + 1
    assert gt.left_out == {k: v for k, v in names.items() if k not in model_classes}
    assert res.metrics["objects_left_out"] == sum(gt.left_out.values()) > 0
    for label, name in enumerate(model_classes, start=1):
        assert sum(int((g["labels"] == label).sum()) for g in gt.boxes.values()) == names[name]
    assert res.metrics["map50"] == 1.0


def test_one_models_uri_parser():
    assert parse_registry_ref("models:/frcnn/3") == ("frcnn", "3", None)
    assert parse_registry_ref("models:/frcnn-demo@champion") == ("frcnn-demo", None, "champion")
    assert parse_registry_ref("frcnn/2") is None and parse_registry_ref("frcnn/2", bare=True) == ("frcnn", "2", None)
    assert parse_registry_ref("/tmp/x/checkpoint.pt", bare=True) is None
    for bad in ("models:/frcnn", "models:/frcnn/latest", "models:/a/b/3"):
        with pytest.raises(ValueError, match="models:/NAME/VERSION or models:/NAME@ALIAS"):
            parse_registry_ref(bad)


# --------------------------------------------------------------------------- evaluate a detections file


def test_detections_file_perfect_then_half(synth, tracking_uri, tmp_path):
    gt = load_ground_truth(synth, "trainval")
    perfect = [(i, g["boxes"], g["labels"]) for i, g in gt.boxes.items()]
    res = run_evaluation(detections=_write_dets(tmp_path / "perfect.parquet", perfect), data_root=synth,
                         split="trainval", experiment="eval-test", verbose=False)
    assert res.metrics["map50"] == 1.0 and res.metrics["map50_voc07"] == pytest.approx(1.0)
    assert res.metrics["coco_map"] == pytest.approx(1.0)

    # Drop every other non-difficult object of each class: every kept box is a TP at score 1, so
    # precision stays 1 and each class's all-point AP is its recall, kept / total.
    seen = {c: 0 for c in range(1, 6)}
    half = []
    for i, g in gt.boxes.items():
        keep = []
        for b, lab, diff in zip(g["boxes"], g["labels"], g["difficult"]):
            if not diff:
                seen[int(lab)] += 1
                if seen[int(lab)] % 2 == 0:
                    continue
            keep.append((b, lab))
        half.append((i, [b for b, _ in keep], [lab for _, lab in keep]))
    expected = {c: math.ceil(n / 2) / n for c, n in seen.items() if n}
    res = run_evaluation(detections=_write_dets(tmp_path / "half.parquet", half), data_root=synth,
                         split="trainval", experiment="eval-test", verbose=False)
    for row in res.per_class:
        c = SYNTH_CLASSES.index(row["class"]) + 1
        if c not in expected:  # no ground truth of that class: NaN, left out of the mean
            assert math.isnan(row["ap_voc"])
            continue
        assert row["ap_voc"] == pytest.approx(expected[c])
        assert row["ap_voc07"] == pytest.approx(sum(expected[c] >= t for t in np.arange(0, 1.1, 0.1)) / 11)
    assert res.metrics["map50"] == pytest.approx(np.mean(list(expected.values())))
    assert 0 < res.metrics["coco_map"] < 1.0


def test_detections_from_an_infer_output_folder(synth, tracking_uri, tmp_path):
    """infer's layout: published run=... partitions (with _SUCCESS), _errors/ tables, ids that are paths
    under the input folder, model columns. An unpublished partition is never read."""
    from mlflow.tracking import MlflowClient

    gt = load_ground_truth(synth, "test")
    ids = list(gt.boxes)
    out = tmp_path / "infer-out"

    def part(folder, rows, version):
        folder.mkdir(parents=True)
        table = pa.table({
            "image_id": pa.array([f"VOC2007/JPEGImages/{i}.jpg" for i in rows], pa.string()),
            "boxes": pa.array([gt.boxes[i]["boxes"].reshape(-1) for i in rows], pa.list_(pa.float32())),
            "scores": pa.array([np.ones(len(gt.boxes[i]["labels"]), np.float32) for i in rows],
                               pa.list_(pa.float32())),
            "labels": pa.array([gt.boxes[i]["labels"].astype(np.int32) for i in rows], pa.list_(pa.int32())),
            "model_name": pa.array(["frcnn"] * len(rows), pa.string()),
            "model_version": pa.array([version] * len(rows), pa.string()),
        })
        pq.write_table(table, folder / "part-0.parquet")

    part(out / "run=20260101T000000-aaaa", ids[1:], "7")
    (out / "run=20260101T000000-aaaa" / "_errors").mkdir()
    pq.write_table(pa.table({"image_id": [f"VOC2007/JPEGImages/{ids[0]}.jpg"], "reason": ["unreadable file"]}),
                   out / "run=20260101T000000-aaaa" / "_errors" / "part-0.parquet")
    (out / "run=20260101T000000-aaaa" / "_SUCCESS").write_text("{}")
    part(out / "run=20260102T000000-bbbb", ids, "8")  # no _SUCCESS: still being written

    res = run_evaluation(detections=str(out), data_root=synth, split="test", experiment="eval-test", verbose=False)
    assert res.metrics["images_with_errors"] == 1 and res.metrics["images_missing"] == 0
    lost = int((~gt.boxes[ids[0]]["difficult"]).sum())  # the unreadable image's objects are misses
    assert (res.metrics["map50"] == 1.0) == (lost == 0)
    tags = MlflowClient(tracking_uri).get_run(res.run_id).data.tags
    assert (tags["frcnn.model_name"], tags["frcnn.model_version"]) == ("frcnn", "7")


def test_detections_file_with_unknown_ids_is_refused(synth, tracking_uri, tmp_path):
    path = _write_dets(tmp_path / "other.parquet", [("nope", [[0, 0, 5, 5]], [1])])
    with pytest.raises(EvaluationError, match="none of its 1 image ids"):
        run_evaluation(detections=path, data_root=synth, split="test", experiment="eval-test")


def test_cli_evaluate_detections(synth, tracking_uri, tmp_path):
    from click.testing import CliRunner

    from jobs.cli import main

    gt = load_ground_truth(synth, "test")
    path = _write_dets(tmp_path / "d.parquet", [(i, g["boxes"], g["labels"]) for i, g in gt.boxes.items()])
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", "--detections", path, "--dataset", "voc", "--data-root", synth,
                               "--split", "test", "--experiment", "cli-eval"])
    assert res.exit_code == 0, res.output
    assert "map50=1.0000" in res.output and "MLflow evaluation run" in res.output
    res = runner.invoke(main, ["evaluate", "--data-root", synth])
    assert res.exit_code == 2 and "exactly one of --model or --detections" in res.output


# --------------------------------------------------------------------------- promote


def _fake_eval(client, exp_id, version, value, status="FINISHED", data_root="/data/voc"):
    run = client.create_run(exp_id, run_name="evaluate-test", tags={
        "frcnn.job": "evaluate", "frcnn.dataset": "voc", "frcnn.split": "test", "frcnn.data_root": data_root,
        "frcnn.years": "all", "frcnn.model_name": "frcnn", "frcnn.model_version": str(version)})
    client.log_metric(run.info.run_id, "map50", value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _holder(client, alias="champion") -> str:
    return str(client.get_model_version_by_alias("frcnn", alias).version)


def test_promote_if_better_than(tracking_uri, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.models import register_model

    tracking.setup(tracking_uri, "promote-test")
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    with mlflow.start_run():
        assert register_model(ckpt, "frcnn") == "1"
    with mlflow.start_run():
        assert register_model(ckpt, "frcnn") == "2"
    client = MlflowClient(tracking_uri)
    v1 = client.get_model_version("frcnn", "1")
    for _ in (3, 4):  # same files, registered again without a second upload
        client.create_model_version("frcnn", v1.source, run_id=v1.run_id)
    exp_id = client.get_experiment_by_name("promote-test").experiment_id
    _fake_eval(client, exp_id, 1, 0.6)
    _fake_eval(client, exp_id, 2, 0.7)
    _fake_eval(client, exp_id, 3, 0.5)
    _fake_eval(client, exp_id, 4, 0.99, status="FAILED")  # not FINISHED: does not count
    _fake_eval(client, exp_id, 4, 0.99, data_root="/elsewhere")  # other data: not comparable

    res = promote("models:/frcnn/1", "champion", if_better_than="champion")
    assert res.promoted and "nobody holds @champion" in res.message
    assert _holder(client) == "1"

    capsys.readouterr()
    res = promote("frcnn/2", "champion", if_better_than="champion", metric="map50")
    out = capsys.readouterr().out
    assert res.promoted and (res.candidate_value, res.incumbent_value) == (0.7, 0.6)
    assert "0.7000" in out and "0.6000" in out and "version 2 (was 1)" in out
    assert _holder(client) == "2"

    res = promote("models:/frcnn/3", "champion", if_better_than="champion")
    assert not res.promoted and "NOT promoted" in res.message
    assert _holder(client) == "2"

    with pytest.raises(PromotionError, match="no FINISHED evaluation run of models:/frcnn/4 on voc/test"):
        promote("models:/frcnn/4", "champion", if_better_than="champion", data_root="/data/voc")
    assert _holder(client) == "2"

    # An incumbent evaluated elsewhere only: the comparison is refused, not guessed.
    with pytest.raises(PromotionError, match="@champion version models:/frcnn/2 on voc/test at /elsewhere"):
        promote("models:/frcnn/4", "champion", if_better_than="champion")

    # Without a condition the alias is just set; the CLI reports a missing evaluation as exit 1.
    assert promote("models:/frcnn/3", "staging").promoted
    assert _holder(client, "staging") == "3"
    from click.testing import CliRunner

    from jobs.cli import main

    res = CliRunner().invoke(main, ["promote", "models:/frcnn/4", "--alias", "champion", "--if-better-than",
                                    "champion", "--data-root", "/data/voc"])
    assert res.exit_code == 1 and "no FINISHED evaluation run" in res.output


def test_ui_command(tracking_uri):
    cmd = ui_command(port=5123, host="0.0.0.0")
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == tracking_uri
    assert cmd[cmd.index("--port") + 1] == "5123" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--workers") + 1] == "1"
