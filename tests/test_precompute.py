"""The Ray Data precompute job, its publishing protocol and its CLI (real Ray, real MLflow).

Small on purpose (2 shared cores): a 24-image synthetic dataset at 64-128 px, a 128 px canvas.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from frcnn.anchors import assign_anchor_targets, grid_anchors
from frcnn.boxes import BoxCoder
from frcnn.config import AnchorConfig, ModelConfig, tiny_config
from pipelines import precompute as pc
from pipelines.schema import MANIFEST_NAME, ManifestMismatch, batch_to_tensors, decode_canvas
from pipelines.synth import SYNTH_CLASSES
from pipelines.voc import list_split, parse_annotation

REPO = Path(__file__).resolve().parents[1]
CANVAS = 128

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return tiny_config(5, SYNTH_CLASSES, canvas=CANVAS)


@pytest.fixture(scope="module")
def synth_root(synth_dataset) -> str:
    return str(synth_dataset(n_images=24, seed=3, min_size=64, max_size=128).root)


@pytest.fixture(scope="module")
def good(ray_session, synth_root, cfg, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "trainval")
    summary = pc.precompute(synth_root, "trainval", out, cfg, rows_per_shard=8, progress=False)
    return out, summary


# --------------------------------------------------------------------------- helpers


def voc_xml(width: int, height: int, objects=()) -> bytes:
    """objects: (name, (xmin, ymin, xmax, ymax) or None for no <bndbox>, difficult)."""
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult>")
        if box is not None:
            parts.append("<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(
                ("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>")
        parts.append("</object>")
    return ("".join(parts) + "</annotation>").encode()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<annotation><size><width>64</width><height>64</height></size><object><name>&lol4;</name></object></annotation>
"""


def image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def damaged(synth_root, tmp_path_factory):
    """A copy of the synth dataset with one split entry per problem case.

    Returns (root, expected skipped {image_id: source}, expected warning {image_id: source},
    ids of every split entry).
    """
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(synth_root, root)
    voc = root / "VOCdevkit" / "VOC2007"
    ids = [i.image_id for i in list_split(str(root), "trainval")]
    assert len(ids) >= 14
    def ann(i: str) -> Path:
        return voc / "Annotations" / f"{i}.xml"

    def img(i: str) -> Path:
        return voc / "JPEGImages" / f"{i}.jpg"

    good_obj = ("rectangle", (3, 3, 30, 30), False)
    skipped, warned = {}, {}

    data = img(ids[0]).read_bytes()  # truncated JPEG
    img(ids[0]).write_bytes(data[: len(data) // 2])
    skipped[ids[0]] = str(img(ids[0]))
    img(ids[1]).write_bytes(b"this is not a JPEG at all" * 40)  # garbage JPEG
    skipped[ids[1]] = str(img(ids[1]))
    ann(ids[2]).write_bytes(b"<annotation><size><width>10</width>")  # malformed XML
    skipped[ids[2]] = str(ann(ids[2]))
    ann(ids[3]).write_bytes(BILLION_LAUGHS)  # entity expansion
    skipped[ids[3]] = str(ann(ids[3]))
    cases = {
        4: [("ellipse", None, False), good_obj],  # missing bndbox
        5: [("ellipse", (40, 10, 20, 30), False), good_obj],  # inverted box
        6: [("ellipse", (11, 10, 10, 30), False), good_obj],  # zero-area (VOC: xmax = xmin - 1)
        7: [("ellipse", (10, 10, 5000, 30), False), ("cross", (4000, 4000, 4100, 4100), False), good_obj],
        8: [("unicorn", (5, 5, 20, 20), False), good_obj],  # unknown class
        9: [],  # no objects at all
    }
    for k, objects in cases.items():
        w, h = image_size(str(img(ids[k])))
        ann(ids[k]).write_bytes(voc_xml(w, h, objects))
        warned[ids[k]] = str(ann(ids[k]))
    img(ids[10]).unlink()  # annotation but no image
    skipped[ids[10]] = str(voc / "JPEGImages" / f"{ids[10]}.jpg")
    ann(ids[11]).unlink()  # image but no annotation
    skipped[ids[11]] = str(ann(ids[11]))
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(split.read_text() + "ghost\n")  # a split entry with no file at all
    skipped["ghost"] = str(ann("ghost"))
    return str(root), skipped, warned, ids + ["ghost"]


def recompute(cfg: ModelConfig, boxes: np.ndarray, difficult: np.ndarray):
    fh, fw = cfg.feature_size
    anchors = grid_anchors(fh, fw, cfg.anchors.stride, cfg.anchors.scales, cfg.anchors.ratios)
    return assign_anchor_targets(anchors, torch.from_numpy(boxes[~difficult]), (cfg.canvas.height, cfg.canvas.width),
                                 cfg.rpn.pos_iou, cfg.rpn.neg_iou, BoxCoder(cfg.rpn.box_weights))


# --------------------------------------------------------------------------- tests


def test_targets_read_back_equal_recomputed(good, cfg, synth_root):
    out, summary = good
    items = {i.image_id: i for i in list_split(synth_root, "trainval")}
    ds, manifest = pc.open_precomputed(out, cfg)
    rows = ds.take_all()
    assert summary.rows == manifest["rows"] == len(items) == len(rows)
    assert summary.skipped == [] and manifest["skipped"] == []
    assert all("all-negative" in w["reason"] for w in summary.warnings)  # synth's empty images only
    assert manifest["targets"] == cfg.target_fields() and manifest["config_hash"] == cfg.target_hash()
    assert manifest["class_names"] == list(SYNTH_CLASSES) and manifest["split"] == "trainval"
    assert ModelConfig.from_dict(manifest["model_config"]) == cfg
    assert manifest["package_version"] and manifest["created_at"]
    assert sorted(os.listdir(out)) == sorted(manifest["shards"] + [MANIFEST_NAME])
    assert len(manifest["shards"]) >= 3  # 8 rows per shard at most

    n_difficult = 0
    for row in rows:
        item = items[row["image_id"]]
        ann, _ = parse_annotation(Path(item.annotation_path).read_bytes(), item.annotation_path,
                                  SYNTH_CLASSES, row["image_id"])
        assert (row["orig_width"], row["orig_height"]) == image_size(item.image_path) == (ann.width, ann.height)
        scale = min(CANVAS / ann.height, CANVAS / ann.width)
        assert row["scale"] == pytest.approx(scale, rel=1e-6)
        boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
        difficult = np.asarray(row["difficult"], dtype=bool)
        np.testing.assert_allclose(boxes, ann.boxes * scale, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(row["labels"], ann.labels)
        np.testing.assert_array_equal(difficult, ann.difficult)
        n_difficult += int(difficult.sum())
        assert decode_canvas(row["image"]).shape == (CANVAS, CANVAS, 3)

        t = recompute(cfg, boxes, difficult)
        np.testing.assert_array_equal(row["anchor_labels"], t.labels.numpy())
        np.testing.assert_array_equal(row["pos_anchor_index"], t.pos_index.numpy())
        np.testing.assert_allclose(np.asarray(row["pos_anchor_deltas"]).reshape(-1, 4),
                                   t.deltas[t.pos_index].numpy(), rtol=1e-5, atol=1e-6)
    positives = manifest["positives_per_image"]
    assert positives > 0 and summary.positives_per_image == positives

    batch = {k: [r[k] for r in rows[:4]] for k in rows[0]}  # rows as Ray Data hands them over
    images, targets = batch_to_tensors(batch, cfg.num_anchor_positions)
    assert images.shape == (4, 3, CANVAS, CANVAS) and images.dtype == torch.uint8
    assert targets["anchor_labels"].shape == (4, cfg.num_anchor_positions)
    assert targets["anchor_deltas"].shape == (4, cfg.num_anchor_positions, 4)


def test_every_bad_input_is_reported_and_good_images_kept(ray_session, damaged, cfg, tmp_path):
    root, skipped, warned, ids = damaged
    out = str(tmp_path / "out")
    summary = pc.precompute(root, "trainval", out, cfg, rows_per_shard=8, progress=False)
    manifest = json.loads((Path(out) / MANIFEST_NAME).read_text())

    by_source = {r["source"]: r["reason"] for r in manifest["skipped"]}
    assert set(by_source) == set(skipped.values()), manifest["skipped"]
    reasons = {i: by_source[src] for i, src in skipped.items()}
    assert "image does not decode" in reasons[ids[0]] and "truncated" in reasons[ids[0]]
    assert "image does not decode" in reasons[ids[1]]
    assert "does not parse" in reasons[ids[2]]
    assert "forbidden" in reasons[ids[3]] and "Entit" in reasons[ids[3]]
    assert "no image file" in reasons[ids[10]]
    assert "annotation file not found" in reasons[ids[11]]
    assert "no annotation file and no image file" in reasons["ghost"]

    warn = {}
    for r in manifest["warnings"]:
        warn.setdefault(r["source"], []).append(r["reason"])
    for i, src in warned.items():
        assert src in warn, (i, manifest["warnings"])
    w = {i: " | ".join(warn[src]) for i, src in warned.items()}
    assert "missing <bndbox>" in w[ids[4]]
    assert "inverted box" in w[ids[5]]
    assert "zero-area box" in w[ids[6]]
    assert "clipped" in w[ids[7]] and "entirely outside" in w[ids[7]]
    assert "unknown class 'unicorn'" in w[ids[8]]
    assert "no objects: kept as an all-negative example" in w[ids[9]]

    ds, _ = pc.open_precomputed(out, cfg)
    rows = {r["image_id"]: r for r in ds.take_all()}
    assert set(rows) == set(ids) - set(skipped)
    assert summary.rows == len(rows) and summary.skipped == manifest["skipped"]
    assert len(rows[ids[7]]["labels"]) == 2  # the clipped ellipse and the good rectangle
    np.testing.assert_allclose(np.asarray(rows[ids[7]]["boxes"]).reshape(-1, 4)[:, 2].max() / rows[ids[7]]["scale"],
                               rows[ids[7]]["orig_width"], rtol=1e-5)  # clipped at the image border

    # drop_empty turns the image without objects into a skipped one
    out2 = str(tmp_path / "out2")
    s2 = pc.precompute(root, "trainval", out2, cfg, drop_empty=True, progress=False)
    assert any(r["source"] == warned[ids[9]] and "drop_empty" in r["reason"] for r in s2.skipped)
    assert s2.rows == summary.rows - sum("all-negative" in r["reason"] for r in summary.warnings)


def test_on_error_fail_names_the_file_and_publishes_nothing(ray_session, damaged, tmp_path, tracking_uri,
                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.data_cmds import run_precompute

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    root, skipped, warned, _ = damaged
    out = tmp_path / "out"
    with pytest.raises(pc.PrecomputeError) as err:
        run_precompute(root, "trainval", str(out), on_error="fail", experiment="fail-test", progress=False,
                       tracking_uri=tracking_uri, rows_per_shard=4)
    source, _, reason = str(err.value).partition(": ")
    assert source in set(skipped.values()) | set(warned.values()) and reason, str(err.value)
    assert (err.value.source, err.value.reason) == (source, reason)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the staging folder is gone too
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("fail-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["frcnn.job"] == "precompute"


def _fail_at_image(monkeypatch, image_id: str) -> None:
    """Fault injected from the test: the block holding ``image_id`` raises in its Ray task. The
    wrapper is a closure, so Ray pickles it by value and the workers run it, not the module's."""
    real = pc.precompute_block

    def failing_block(batch, **kwargs):
        if image_id in batch.column("image_id").to_pylist():
            raise RuntimeError(f"injected fault at image {image_id}")
        yield from real(batch, **kwargs)

    monkeypatch.setattr(pc, "precompute_block", failing_block)


def test_failed_run_publishes_nothing_and_leaves_the_old_output(ray_session, good, synth_root, cfg, tmp_path,
                                                               monkeypatch):
    good_out, good_summary = good
    ids = [i.image_id for i in list_split(synth_root, "trainval")]
    _fail_at_image(monkeypatch, ids[8])
    # A run failing half-way: `out` never appears, and no staging folder is left.
    out = tmp_path / "failed"
    with pytest.raises(pc.PrecomputeError, match=f"injected fault at image {ids[8]}"):
        pc.precompute(synth_root, "trainval", str(out), cfg, rows_per_shard=4, progress=False)
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no manifest"):
        pc.open_precomputed(str(out), cfg)

    # An existing good output survives a failing rerun with overwrite, byte for byte.
    existing = tmp_path / "existing"
    shutil.copytree(good_out, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(pc.PrecomputeError, match="injected fault"):
        pc.precompute(synth_root, "trainval", str(existing), cfg, overwrite=True, rows_per_shard=4,
                      progress=False)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert os.listdir(tmp_path) == ["existing"]
    ds, _ = pc.open_precomputed(str(existing), cfg)
    assert ds.count() == good_summary.rows
    monkeypatch.undo()

    # Without overwrite: refused before any work (no staging folder is even created).
    entries = set(os.listdir(tmp_path))
    with pytest.raises(FileExistsError, match="already exists"):
        pc.precompute(synth_root, "trainval", str(existing), cfg, progress=False)
    assert set(os.listdir(tmp_path)) == entries

    # With overwrite: replaced cleanly, nothing of the old output left behind.
    summary = pc.precompute(synth_root, "trainval", str(existing), cfg, overwrite=True, rows_per_shard=4,
                            progress=False)
    names = set(os.listdir(existing))
    assert names == set(summary.shards) | {MANIFEST_NAME} and not names & set(before) - {MANIFEST_NAME}
    assert os.listdir(tmp_path) == ["existing"]
    ds, manifest = pc.open_precomputed(str(existing), cfg)
    assert ds.count() == manifest["rows"] == good_summary.rows


def test_manifest_guard_names_the_field(good, cfg):
    out, _ = good
    other = cfg.replace(anchors=AnchorConfig(stride=16, scales=(2.0, 4.0, 16.0), ratios=(0.5, 1.0, 2.0)))
    with pytest.raises(ManifestMismatch, match="anchor_scales"):
        pc.open_precomputed(out, other)
    with pytest.raises(ManifestMismatch, match="canvas_height"):
        pc.open_precomputed(out, tiny_config(5, SYNTH_CLASSES, canvas=192))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        pc.open_precomputed(str(Path(out).parent / "nothing-here"), cfg)


def test_run_precompute_tracks_params_metrics_and_manifest(ray_session, synth_root, tmp_path, tracking_uri,
                                                           monkeypatch):
    from mlflow.tracking import MlflowClient

    from jobs.data_cmds import run_precompute

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = str(tmp_path / "train")
    # A file:// URI goes through the same pyarrow filesystem layer as s3:// or gs://.
    res = run_precompute(Path(synth_root).as_uri(), "train", out, experiment="precompute-test",
                         tracking_uri=tracking_uri, rows_per_shard=8, progress=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == f"precompute-{Path(synth_root).name}-train"
    assert run.data.tags["frcnn.job"] == "precompute"
    params = run.data.params
    assert params["model.canvas.height"] == "192" and params["model.num_classes"] == "5"  # tiny defaults
    assert params["precompute.split"] == "train" and params["precompute.out"] == out
    m = run.data.metrics
    assert m["images_written"] == res.summary.rows == len(list_split(synth_root, "train"))
    assert m["images_skipped"] == 0 and m["positives_per_image"] > 0 and m["images_per_s"] > 0
    assert MANIFEST_NAME in {a.path for a in client.list_artifacts(res.run_id)}
    local = client.download_artifacts(res.run_id, MANIFEST_NAME, str(tmp_path))
    assert json.loads(Path(local).read_text())["rows"] == res.summary.rows


def test_cli_synth_then_precompute(ray_session, tmp_path, tracking_uri, monkeypatch):
    from jobs.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    runner = CliRunner()
    data, out = str(tmp_path / "data"), str(tmp_path / "pre")
    r = runner.invoke(main, ["synth", "--out", data, "--images", "8", "--min-size", "64", "--max-size", "96"])
    assert r.exit_code == 0, r.output
    assert "wrote 8 images" in r.output
    args = ["precompute", "--dataset", "voc", "--data-root", data, "--split", "trainval", "--out", out,
            "--year", "2007", "--rows-per-shard", "4", "--experiment", "cli-test"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "MLflow run" in r.output
    ds, manifest = pc.open_precomputed(out, tiny_config(5, SYNTH_CLASSES))
    assert ds.count() == manifest["rows"] == len(list_split(data, "trainval")) and manifest["years"] == ["2007"]

    r = runner.invoke(main, args)  # out exists: a clear error, no traceback
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, args[:-4] + ["--year", "20x7"])
    assert r.exit_code == 2 and "expected years" in r.output
    r = runner.invoke(main, ["precompute", "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output


# --------------------------------------------------------------------------- classes


def test_model_classes_rule_dataset_classes_left_out_and_counted(ray_session, synth_root, tmp_path):
    model = ("triangle", "ellipse")  # a subset, in another order than the dataset's
    cfg3 = tiny_config(2, model, canvas=CANVAS)
    out = tmp_path / "two"
    summary = pc.precompute(synth_root, "trainval", str(out), cfg3, rows_per_shard=8, progress=False)
    expected_left = {}
    expected_labels = {}
    for item in list_split(synth_root, "trainval"):  # oracle: parse with every class, count by hand
        ann, _ = parse_annotation(Path(item.annotation_path).read_bytes(), item.annotation_path, SYNTH_CLASSES)
        names = [SYNTH_CLASSES[k - 1] for k in ann.labels]
        for n in names:
            if n not in model:
                expected_left[n] = expected_left.get(n, 0) + 1
        expected_labels[item.image_id] = [model.index(n) + 1 for n in names if n in model]
    assert expected_left and summary.left_out == expected_left
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["left_out"] == expected_left and manifest["class_names"] == list(model)
    assert manifest["dataset_classes"] == list(SYNTH_CLASSES)
    assert not any("unknown class" in w["reason"] for w in summary.warnings)  # left out, not problems
    ds, _ = pc.open_precomputed(str(out), cfg3)
    got = {r["image_id"]: list(r["labels"]) for r in ds.take_all()}
    assert got == expected_labels

    # A model class the dataset does not have: refused before any work, naming it.
    with pytest.raises(ValueError, match="'unicorn' not in the dataset"):
        pc.precompute(synth_root, "trainval", str(tmp_path / "x"), tiny_config(2, ("ellipse", "unicorn")),
                      progress=False)
    # --classes: the dataset's list given by hand (here a dataset without classes.txt would be VOC's 20).
    with pytest.raises(ValueError, match="'triangle' not in the dataset"):
        pc.precompute(synth_root, "trainval", str(tmp_path / "y"), cfg3, classes=("ellipse", "cross"),
                      progress=False)
    assert sorted(os.listdir(tmp_path)) == ["two"]


def test_progress_lines_come_from_the_ledger(ray_session, capsys):
    import re
    import time

    from pipelines.precompute_job import Progress, get_ledger

    ledger = get_ledger()
    run = "progress-test"
    ray_session.get(ledger.tick.remote(run, 7))  # what the tasks send, about once a second each
    with Progress(ledger, run, 20, interval=0.05):
        time.sleep(0.6)
    assert ray_session.get(ledger.finish.remote(run))["ticked"] == 7
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2, lines
    assert all(re.fullmatch(r"precompute: 7/20 images, [0-9.]+ images/s, [0-9]+s", line) for line in lines), lines


# --------------------------------------------------------------------------- kill -9 and Ctrl-C

_SLOW_CLI = """
import sys, time
from pipelines import precompute as pc

real = pc.precompute_block

def slow_block(batch, **kwargs):  # defined in __main__: Ray ships it to the workers by value
    for table in real(batch, **kwargs):
        time.sleep(1.5)
        yield table

pc.precompute_block = slow_block
from jobs.cli import main
main(sys.argv[1:], prog_name="frcnn-jobs")
"""


def _start_slow_precompute(synth_root: str, out: Path, tracking_uri: str):
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = ["precompute", "--data-root", synth_root, "--split", "trainval", "--out", str(out),
            "--rows-per-shard", "4", "--experiment", "kill-test"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, args


def _wait_for_a_staged_shard(proc, out: Path, timeout: float = 480.0) -> Path:
    import time

    staging_root = out.parent / "_staging"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"precompute ended before it was stopped: {proc.communicate()}")
        shards = list(staging_root.glob(f"{out.name}.*/*.parquet"))
        if shards:
            return shards[0].parent
        time.sleep(0.05)
    raise AssertionError("no shard was staged in time")


def _kill_session(proc) -> None:
    """SIGKILL the subprocess's whole session (its Ray processes too): what a lost machine does."""
    import signal

    import psutil

    sid = proc.pid
    victims = [p for p in psutil.process_iter() if _sid(p) == sid]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.communicate()


def _sid(p) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def test_kill_9_leaves_nothing_at_out_and_the_rerun_cleans_up(ray_session, synth_root, cfg, tmp_path, tracking_uri,
                                                              caplog):
    out = tmp_path / "pre"
    proc, _ = _start_slow_precompute(synth_root, out, tracking_uri)
    try:
        staging = _wait_for_a_staged_shard(proc, out)
    finally:
        _kill_session(proc)
    assert not out.exists() and staging.is_dir()  # killed mid-run: nothing visible at out
    with pytest.raises(FileNotFoundError, match="no manifest"):
        pc.open_precomputed(str(out), cfg)

    with caplog.at_level("WARNING", logger="pipelines.storage"):
        summary = pc.precompute(synth_root, "trainval", str(out), cfg, rows_per_shard=4, progress=False)
    assert f"{staging}: staging left by an interrupted run; deleted" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["pre"]  # no staging folder remains
    ds, manifest = pc.open_precomputed(str(out), cfg)
    assert ds.count() == manifest["rows"] == summary.rows == len(list_split(synth_root, "trainval"))


def test_ctrl_c_publishes_nothing_deletes_staging_and_marks_the_run_killed(synth_root, tmp_path, tracking_uri):
    import signal

    from mlflow.tracking import MlflowClient

    out = tmp_path / "pre"
    proc, args = _start_slow_precompute(synth_root, out, tracking_uri)
    try:
        _wait_for_a_staged_shard(proc, out)
        proc.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it first
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _kill_session(proc) if proc.poll() is None else None
    assert proc.returncode == 130, (stdout, stderr)
    assert f"precompute interrupted: nothing published to {out}" in stdout
    assert "Rerun with: frcnn-jobs " + " ".join(args) in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kill-test").experiment_id],
                                filter_string="attributes.status = 'KILLED'")
    assert run.data.tags["frcnn.job"] == "precompute"


def test_a_store_that_fails_to_read_stops_the_run_a_missing_file_is_skipped(synth_root, cfg):
    """A read that fails for another reason than a missing file (the object store not answering)
    must not be recorded as bad input and skipped: the run would publish a dataset silently short."""
    from pipelines.precompute_rows import ImageWorker, StorageReadError

    item = next(i for i in list_split(synth_root, "trainval"))
    spec = {"cfg": cfg.to_dict(), "class_names": list(SYNTH_CLASSES), "dataset_classes": list(SYNTH_CLASSES),
            "use_difficult": False, "drop_empty": False, "jpeg_quality": 95, "data_root": synth_root,
            "root_shown": synth_root}
    worker = ImageWorker(spec)
    result = worker.process(dict(vars(item)))
    assert result.row is not None and result.skipped == ()  # the stage itself works on this item

    def failing(error):
        def read(path):
            if path == item.image_path:
                raise error
            return ImageWorker.read(worker, path)
        return read

    worker.read = failing(ConnectionError("Connection reset by peer"))
    with pytest.raises(StorageReadError, match=f"{item.image_path}: cannot read: Connection reset"):
        worker.process(dict(vars(item)))
    worker.read = failing(FileNotFoundError(item.image_path))
    result = worker.process(dict(vars(item)))
    assert result.row is None
    assert [(s["source"], s["reason"]) for s in result.skipped] == [(item.image_path, "image file not found")]


# --------------------------------------------------------------------------- an object store that goes away


@pytest.fixture()
def s3_behind_a_relay(tmp_path):
    """moto's S3 server on 127.0.0.1 with a bucket, reached through a relay the test can cut."""
    import subprocess
    import sys

    import boto3

    from infra.rehearsal.relay import Relay, free_ports, port_open
    from infra.rehearsal.stack import wait_for

    moto_port, relay_port = free_ports(2)
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    log = open(tmp_path / "moto.log", "wb")
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("moto", lambda: port_open(moto_port), 30)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="frcnn")
        relay = Relay(relay_port, moto_port)
        yield s3, relay, {**keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay_port}"}
        relay.cut()
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        log.close()


def test_an_object_store_that_goes_away_fails_the_run_naming_the_uri_and_publishes_nothing(
        synth_root, tmp_path, tracking_uri, s3_behind_a_relay):
    """The S3 endpoint stops answering after a shard is staged. Ray Data's own write retries (10
    attempts, backoff up to 32 s, each through a filesystem that retries 10 times more) kept such a
    run busy for over 15 minutes in the cluster rehearsal; it must fail with one line naming the
    output URI, and publish nothing."""
    import subprocess
    import sys
    import time

    s3, relay, s3_env = s3_behind_a_relay
    out = "s3://frcnn/pre/trainval"
    env = {**os.environ, **s3_env, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = ["precompute", "--data-root", synth_root, "--split", "trainval", "--out", out, "--rows-per-shard", "4",
            "--experiment", "s3-down"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def staged() -> list[str]:
        listed = s3.list_objects_v2(Bucket="frcnn", Prefix="pre/_staging/").get("Contents", [])
        return [o["Key"] for o in listed if o["Key"].endswith(".parquet")]

    try:
        deadline = time.monotonic() + 480
        while not staged():
            assert proc.poll() is None, f"precompute ended before the store went away: {proc.communicate()}"
            assert time.monotonic() < deadline, "no shard was staged in time"
            time.sleep(0.05)
        relay.cut()
        stdout, stderr = proc.communicate(timeout=600)  # bounded by the S3 client's retries, not Ray Data's
    finally:
        _kill_session(proc) if proc.poll() is None else None
    assert proc.returncode == 1, (stdout, stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and out in last, stderr[-3000:]
    assert "Traceback" not in stderr
    published = s3.list_objects_v2(Bucket="frcnn", Prefix="pre/trainval").get("Contents", [])
    assert published == [], [o["Key"] for o in published]
