"""``frcnn-jobs infer``: real Ray Data (the session's local Ray), real MLflow (a tmp sqlite store).

Most tests use an initialised, untrained tiny detector: the coordinate test recomputes each
image's detections in the test (the model on the canvas, then the test's own arithmetic: divide by
the canvas scale, clip to the image) and requires the job's boxes to equal them, in ORIGINAL
pixels of images larger and smaller than the canvas, of several aspect ratios and colour modes.
One test overfits a tiny model on four pictures (~20 s) and requires the job to return their
known boxes, scaled to the saved images' pixels, with the right classes. The rest checks the
scheduling contract: layout, publishing (locally and the object-store way), incremental ledger,
interrupted and killed runs of the real command, unreadable inputs, Parquet input, MLflow run and
exit codes.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN, tiny_config
from frcnn.canvas import to_tensor
from frcnn.training import TrainConfig, checkpoint_state, load_checkpoint, model_from_checkpoint
from pipelines import infer
from pipelines.storage import Location
from pipelines.synth import SYNTH_CLASSES, render_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[str, bytes]:
    cfg = tiny_config(num_classes=5, class_names=SYNTH_CLASSES, canvas=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "checkpoint.pt"
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), path)
    return str(path), path.read_bytes()


def _image(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = render_image(np.random.default_rng(seed), w, h)
    image.convert(mode).save(path)
    return path


def _run(inp, out, ckpt_bytes, **kw) -> infer.InferSummary:
    kw.setdefault("batch_size", 2)
    out = out if isinstance(out, Location) else str(out)
    return infer.run_inference(str(inp), out, ckpt_bytes, progress=False, **kw)


def _boxes(row) -> np.ndarray:
    return np.asarray(row["boxes"], np.float32).reshape(-1, 4)


# --------------------------------------------------------------------------- one run

SIZES = {"a.jpg": (200, 150, "RGB"), "sub/b.png": (300, 260, "RGB"), "sub/deep/grey.png": (90, 140, "L"),
         "rgba.PNG": (64, 48, "RGBA")}  # larger and smaller than the 128 canvas; tall and wide


@pytest.fixture(scope="module")
def first_run(ckpt, ray_session, tmp_path_factory):
    """One incremental run over a folder of good and unreadable images (shared: runs cost seconds)."""
    root = tmp_path_factory.mktemp("first")
    inp, out = root / "in", root / "out"
    for k, (name, (w, h, mode)) in enumerate(SIZES.items()):
        _image(inp / name, w, h, seed=k, mode=mode)
    (inp / "garbage.jpg").write_bytes(b"not an image at all" * 8)
    (inp / "sub" / "empty.png").write_bytes(b"")
    (inp / "notes.txt").write_text("not an input")
    summary = _run(inp, out, ckpt[1], incremental=True, batch_size=1)  # one image per call, as recomputed
    return inp, out, summary


def test_boxes_in_original_pixels_any_mode_and_unreadable_files_reported(ckpt, first_run):
    inp, out, s = first_run
    assert (s.seen, s.new, s.skipped, s.failed, s.written) == (6, 6, 0, 2, 4)
    table = infer.read_published(str(out))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(SIZES)  # ids are paths relative to the input root
    assert table.schema.field("boxes").type == pa.list_(pa.float32())
    assert table.schema.field("labels").type == pa.list_(pa.int32())
    assert table.schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert s.detections == sum(len(r["scores"]) for r in rows.values()) > 0

    model = model_from_checkpoint(load_checkpoint(ckpt[0])).eval()
    for name, (w, h, _) in SIZES.items():
        row = rows[name]
        assert (row["width"], row["height"]) == (w, h)
        image = Image.open(inp / name).convert("RGB")
        canvas, scale = model.canvas.apply_image(image)
        with torch.no_grad():
            det = model(to_tensor(canvas)[None])[0]  # canvas pixels
        expected = det["boxes"].numpy() / scale
        expected[:, 0::2] = expected[:, 0::2].clip(0, w)
        expected[:, 1::2] = expected[:, 1::2].clip(0, h)
        got = _boxes(row)
        assert got.shape == expected.shape and got.shape[0] > 0
        np.testing.assert_allclose(got, expected, atol=1e-3)
        np.testing.assert_allclose(row["scores"], det["scores"].numpy(), atol=1e-5)
        assert row["labels"] == det["labels"].tolist()
        assert row["class_names"] == [SYNTH_CLASSES[label - 1] for label in row["labels"]]
        assert got[:, 2].max() <= w and got[:, 3].max() <= h
    assert _boxes(rows["sub/b.png"])[:, 2].max() > 128  # original pixels, not the canvas's

    r = rows["a.jpg"]
    assert r["model_sha256"] and r["model_name"] is None and r["infer_run_id"] == s.run

    errors = infer.read_published(str(out), errors=True).to_pylist()
    reasons = {e["image_id"]: e for e in errors}
    assert set(reasons) == {"garbage.jpg", "sub/empty.png"}
    assert reasons["garbage.jpg"]["path"] == str(inp / "garbage.jpg")
    assert "unreadable image" in reasons["garbage.jpg"]["reason"]
    assert reasons["sub/empty.png"]["reason"] == "empty file (0 bytes)"
    assert {f["image_id"] for f in s.failures} == set(reasons)

    # Layout: one published partition, marker last with the summary, staging empty.
    [part] = [p for p in out.iterdir() if p.name.startswith("run=")]
    assert part.name == f"run={s.run}" and (part / "_errors").is_dir()
    assert json.loads((part / "_SUCCESS").read_text())["written"] == 4
    assert sorted(p.name for p in part.glob("part-*.parquet")) == sorted(s.parts)
    assert not (out / "_staging").exists() or list((out / "_staging").iterdir()) == []


def test_detector_called_from_several_threads_equals_one_call_at_a_time(ckpt):
    """The predictor actor runs two calls at once (one decodes while the other holds the model):
    results from concurrent callers must be exactly those of one call at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from frcnn.inference import Detector

    rng = np.random.default_rng(7)
    data = []
    for _ in range(24):
        buf = io.BytesIO()
        render_image(rng, int(rng.integers(60, 320)), int(rng.integers(60, 320)))[0].save(buf, "JPEG")
        data.append(buf.getvalue())
    data[5] = b"garbage"  # a failed input stays in its place
    batches = [data[i:i + 4] for i in range(0, len(data), 4)]
    det = Detector.from_checkpoint(ckpt[1], "cpu", threads=1)
    serial = [det.predict(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(det.predict, batches * 3))
    assert sum(len(d.scores) for b in serial for d in b) > 0  # something to compare
    assert serial[1][1].error and serial[1][1].height == -1
    for got, want in zip(concurrent, serial * 3, strict=True):
        for g, w in zip(got, want, strict=True):
            assert (g.error, g.height, g.width) == (w.error, w.height, w.width)
            np.testing.assert_array_equal(g.boxes, w.boxes)
            np.testing.assert_array_equal(g.scores, w.scores)
            np.testing.assert_array_equal(g.labels, w.labels)


def test_cpu_predictor_tasks_keep_each_checkpoint_apart_and_match_the_actor_pool(ckpt, tmp_path):
    """On CPU the predictors are tasks whose worker processes keep the last model they loaded, so
    the next call in the driver skips torch's import and the model load. Calls alternating between
    two checkpoints must each get their own model's detections (the in-process Detector's), and the
    GPU's actor pool, forced on CPU, the same ones."""
    from frcnn.inference import Detector
    from pipelines.predict import PredictorResources, predict_images

    cfg = tiny_config(num_classes=5, class_names=SYNTH_CLASSES, canvas=128)
    torch.manual_seed(1)
    other = io.BytesIO()
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), other)
    models = {"a": ckpt[1], "b": other.getvalue()}
    paths = [_image(tmp_path / "in" / f"{i}.jpg", 90 + 23 * i, 200 - 7 * i, seed=i) for i in range(20)]
    source = Location.of(str(tmp_path / "in"))
    items = [{"image_id": p.stem, "path": str(p), "fs_path": source.path + "/" + p.name} for p in paths]
    data = [p.read_bytes() for p in paths]
    want = {k: {p.stem: d for p, d in zip(paths, Detector.from_checkpoint(v, "cpu", threads=1).predict(data))}
            for k, v in models.items()}
    assert any(not np.array_equal(want["a"][k].scores, want["b"][k].scores) for k in want["a"])  # told apart

    for name, actors in [("a", False), ("b", False), ("a", False), ("b", False), ("a", True)]:
        table = predict_images(items, models[name], source=source, resources=PredictorResources(batch_size=3),
                               actors=actors)
        assert sorted(table.column("image_id").to_pylist()) == sorted(p.stem for p in paths)
        for row in table.to_pylist():
            w = want[name][row["image_id"]]
            assert (row["error"], row["height"], row["width"]) == ("", w.height, w.width)
            np.testing.assert_allclose(np.asarray(row["scores"], np.float32), w.scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(row["boxes"], np.float32).reshape(-1, 4), w.boxes, atol=1e-3)
            assert row["labels"] == w.labels.tolist()


# --------------------------------------------------------------------------- a schedule


def test_incremental_run_processes_only_new_images_and_retries_failures(ckpt, first_run, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(first_run[0], inp)
    shutil.copytree(first_run[1], out)
    s1 = first_run[2]
    for k in range(2):  # new images arrive between two scheduled runs
        _image(inp / f"day2/{k}.png", 80, 100, seed=20 + k)

    s2 = _run(inp, out, ckpt[1], incremental=True)
    # Only the new images, plus the unreadable ones: failures are not in the ledger, so retried.
    assert (s2.seen, s2.skipped, s2.new, s2.written, s2.failed) == (8, 4, 4, 2, 2)
    table = infer.read_published(str(out))
    assert sorted(table.column("image_id").to_pylist()) == sorted([*SIZES, "day2/0.png", "day2/1.png"])  # once each
    assert sorted(set(table.column("run").to_pylist())) == [s1.run, s2.run]
    assert infer.published_runs(str(out)) == [f"run={s1.run}", f"run={s2.run}"]

    # The ledger is per model: another version of the model has processed nothing yet.
    same = infer.ModelIdentity.of_checkpoint(ckpt[1], uri="elsewhere/checkpoint.pt")
    assert len(infer.published_ids(str(out), same)) == 6
    other = infer.ModelIdentity.of_checkpoint(ckpt[1], uri="models:/frcnn/2", name="frcnn", version="2")
    assert infer.published_ids(str(out), other) == set()


# --------------------------------------------------------------------------- Parquet input


class _Recording(pafs.FileSystemHandler):
    """A non-local filesystem (an object store's protocol: no rename is used by publish) over a
    local folder, recording the driver's writes in order."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
        self.log: list[tuple[str, str]] = []

    def __reduce__(self):  # Ray tasks get a fresh handler over the same folder
        return (type(self), (self.root,))

    def get_type_name(self):
        return "recording"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return isinstance(other, _Recording) and other.root == self.root

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.log.append(("delete_dir", path))
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.log.append(("move", dest))
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.log.append(("copy", dest))
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self.log.append(("write", path))
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def test_parquet_table_input_and_object_store_publishing(ckpt, tmp_path):
    png = _image(tmp_path / "x.png", 150, 100, seed=30).read_bytes()
    grey = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(grey, format="PNG")
    images = {"s3://cam/1.png": png, "s3://cam/2.jpg": b"garbage", "s3://cam/3.png": None,
              "s3://cam/4.png": grey.getvalue()}
    table_dir = tmp_path / "table"
    table_dir.mkdir()
    pq.write_table(pa.table({"path": list(images), "image": pa.array(list(images.values()), pa.binary()),
                             "camera": [1, 1, 2, 2]}), table_dir / "batch-0.parquet")

    import sys

    import ray

    # The Ray tasks writing parts get this module's handler class by value (they cannot import tests).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    store = tmp_path / "bucket"
    store.mkdir()
    handler = _Recording(str(store))
    out = Location(pafs.PyFileSystem(handler), "out", "recording://bucket/out")
    s = _run(table_dir, out, ckpt[1], rows_per_file=2)
    assert (s.input_kind, s.seen, s.written, s.failed) == ("table", 4, 2, 2)
    rows = {r["image_id"]: r for r in infer.read_published(out).to_pylist()}
    assert set(rows) == {"s3://cam/1.png", "s3://cam/4.png"}
    assert (rows["s3://cam/4.png"]["width"], rows["s3://cam/4.png"]["height"]) == (150, 100)
    assert 0 < _boxes(rows["s3://cam/1.png"])[:, 2].max() <= 150
    errors = {e["image_id"]: e["reason"] for e in infer.read_published(out, errors=True).to_pylist()}
    assert set(errors) == {"s3://cam/2.jpg", "s3://cam/3.png"}

    # The object-store protocol: no rename; every file copied into the partition, the marker
    # written after the last copy, staging deleted after the marker.
    partition = f"out/run={s.run}"
    assert not [e for e in handler.log if e[0] == "move"]
    copies = [k for k, (op, path) in enumerate(handler.log) if op == "copy" and path.startswith(partition + "/")]
    [marker] = [k for k, (op, path) in enumerate(handler.log) if op == "write" and path == f"{partition}/_SUCCESS"]
    assert len(copies) == len(s.parts) + len(s.error_parts) == 4 and max(copies) < marker  # 2 rows a file
    after = handler.log[marker + 1:]
    assert after and {op for op, _ in after} == {"delete_dir"} and "_staging/" in after[0][1]
    assert (store / partition / "_SUCCESS").is_file() and not list((store / "out").glob("_staging/*"))

    # A table whose ids repeat is refused before anything runs.
    pq.write_table(pa.table({"image_id": ["a", "a"], "image": pa.array([b"x", b"y"], pa.binary())}),
                   tmp_path / "dupes.parquet")
    with pytest.raises(ValueError, match="more than once"):
        infer.list_inputs(str(tmp_path / "dupes.parquet"))
    with pytest.raises(FileNotFoundError):
        infer.list_inputs(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- the command


def _start_and_stop(args: list[str], out: Path, sig: int, env: dict) -> tuple[int, str]:
    """Run ``frcnn-jobs ARGS`` in a subprocess; send ``sig`` once its staging folder holds a part
    file (rows written, nothing published yet); return its exit code and output."""
    import signal
    import subprocess
    import sys
    import time

    exe = Path(sys.executable).with_name("frcnn-jobs")
    proc = subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("_staging/*/part-*.parquet")):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no staged part file within 300 s"
            time.sleep(0.05)
        assert not infer.published_runs(str(out))
        proc.send_signal(sig)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    return proc.returncode, text


def test_cli_interrupted_and_killed_runs_publish_nothing_and_the_next_run_completes(ckpt, tmp_path, tracking_uri,
                                                                                   monkeypatch):
    """Real faults on the real command: Ctrl-C (SIGINT) and ``kill -9`` of ``frcnn-jobs infer``
    once rows sit in staging. Neither publishes anything; Ctrl-C deletes its staging and marks the
    MLflow run KILLED; the next run (alias resolved once, tracked) redoes every input and deletes
    the killed run's staging."""
    import os
    import signal

    import mlflow
    import ray
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from jobs.cli import main
    from jobs.models import register_model

    uri = tracking_uri
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "infer-test")
    monkeypatch.chdir(tmp_path)
    mlflow.set_experiment("train")
    with mlflow.start_run() as train_run:
        assert register_model(ckpt[0], "frcnn") == "1"
    client = MlflowClient(uri)
    client.set_registered_model_alias("frcnn", "champion", "1")

    inp, out = tmp_path / "in", tmp_path / "out"
    n = 300  # more than one output file (256 rows): staging holds a part while the run goes on
    for k in range(n):
        _image(inp / f"{k:03d}.jpg", 64, 48, seed=40 + k)
    args = ["infer", "--model", "models:/frcnn@champion", "--input", str(inp), "--output", str(out),
            "--incremental", "--batch-size", "4"]
    # The subprocesses join the tests' Ray instance rather than starting their own.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    code, text = _start_and_stop(args, out, signal.SIGINT, env)
    assert code == 130, text
    assert "interrupted: nothing of this run was published" in text and "--incremental" in text, text
    assert infer.published_runs(str(out)) == [] and not list(out.glob("_staging/*"))
    _, text = _start_and_stop(args, out, signal.SIGKILL, env)
    assert infer.published_runs(str(out)) == [] and infer.read_published(str(out)).num_rows == 0
    # what a kill leaves: its staging folder and its lease (whose pid is gone: expired)
    [staging] = [p for p in (out / "_staging").iterdir() if p.is_dir()]
    assert (out / "_staging" / "output.lease").is_file()
    assert list(staging.glob("part-*.parquet"))

    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"{n} inputs seen, {n} new, 0 skipped" in res.output and "images/s" in res.output
    assert not staging.exists()
    table = infer.read_published(str(out))
    assert sorted(table.column("image_id").to_pylist()) == sorted(f"{k:03d}.jpg" for k in range(n))
    runs = client.search_runs([client.get_experiment_by_name("infer-test").experiment_id],
                              order_by=["attributes.start_time ASC"])
    # Ctrl-C: KILLED; kill -9: nothing could end it (RUNNING); the next run: FINISHED.
    assert [r.info.status for r in runs] == ["KILLED", "RUNNING", "FINISHED"]
    run = runs[2]
    assert run.info.run_name == "infer-frcnn@champion"
    for col, want in (("model_name", "frcnn"), ("model_version", "1"), ("model_uri", "models:/frcnn@champion"),
                      ("train_run_id", train_run.info.run_id), ("infer_run_id", run.info.run_id)):
        assert set(table.column(col).to_pylist()) == {want}, col
    assert run.data.tags["frcnn.job"] == "infer"
    assert (run.data.tags["frcnn.model_name"], run.data.tags["frcnn.model_version"]) == ("frcnn", "1")
    assert run.data.tags["frcnn.train_run_id"] == train_run.info.run_id
    assert run.data.params["incremental"] == "True" and run.data.params["input"] == str(inp)
    m = run.data.metrics
    assert (m["inputs_seen"], m["inputs_new"], m["inputs_failed"]) == (n, n, 0)
    assert m["detections"] == sum(len(s) for s in table.column("scores").to_pylist()) and m["images_per_s"] > 0


# --------------------------------------------------------------------------- known shapes

def test_trained_model_finds_known_shapes_in_original_pixels(tiny_trained_model, tmp_path):
    """A tiny model overfitted on four 128x128 canvases (the tiny_trained_model fixture), then the
    same pictures saved at 2x and 1.5x: the job must return each known box, scaled to the saved
    image's pixels, with the right class."""
    from torchvision.ops import box_iou

    trained = tiny_trained_model(4, 200)
    model, images, boxes, labels = trained.model, trained.images, trained.boxes, trained.labels
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(checkpoint_state(model.eval(), None, 0, 0, model.cfg, TrainConfig()), ckpt)

    inp = tmp_path / "in"
    inp.mkdir()
    factors = {}
    for i in range(4):
        f = 2.0 if i % 2 == 0 else 1.5
        size = int(128 * f)
        pic = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
        pic.save(inp / f"img{i}.png")
        factors[f"img{i}.png"] = (i, f)
    summary = _run(inp, tmp_path / "out", ckpt.read_bytes(), batch_size=4)
    assert summary.new == 4 and summary.failed == 0
    rows = {r["image_id"]: r for r in infer.read_published(str(tmp_path / "out")).to_pylist()}
    assert set(rows) == set(factors)
    for name, (i, f) in factors.items():
        pred = torch.from_numpy(_boxes(rows[name]))
        plab = torch.tensor(rows[name]["labels"])
        score = torch.tensor(rows[name]["scores"])
        assert rows[name]["width"] == rows[name]["height"] == int(128 * f)
        for b, lab in zip(boxes[i] * f, labels[i]):
            iou = box_iou(b[None], pred)[0] if len(pred) else torch.zeros(1)
            hit = (iou > 0.7) & (plab == lab) & (score > 0.5)
            assert bool(hit.any()), (name, b.tolist(), int(lab), pred.tolist(), plab.tolist())
