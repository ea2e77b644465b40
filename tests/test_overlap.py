"""Runs that overlap or are told to stop, with real concurrent ``frcnn-jobs`` processes: on a local
folder and on moto's S3 server.

- infer: a second run while the first writes is refused at once (exit 75, one line naming the
  first run); a third queues with ``--wait``; the first is then SIGKILLed (local) or sent SIGTERM
  (S3: exit 143, run KILLED, the rerun command printed) and the waiting run takes over: one row per
  image, no traceback, nothing of the live run deleted while it lived.
- precompute: a second run to the same ``--out`` is refused while the first writes; SIGTERM then
  stops the first (exit 143, KILLED, rerun command, old output untouched); a replace interrupted
  after it moved the old output aside keeps it aside while its owner lives, and the next run puts
  it back once the owner is dead.

Slow steps are injected from the test: the runs are started through a small wrapper that slows
one function of the pipeline (shipped to Ray workers by value), as the Ctrl-C tests do.
"""

from __future__ import annotations

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

from frcnn import FasterRCNN, tiny_config
from frcnn.training import TrainConfig, checkpoint_state
from pipelines import infer, lease, storage
from pipelines.synth import SYNTH_CLASSES, render_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24
# FRCNN_LEASE_TTL for the runs: the killed holders run on the test's own host (their pid is gone:
# expired at once); a live holder's heartbeat must not look stale on a loaded machine.
TTL = "30"

_SLOW_INFER = """
import sys, time
from pipelines import infer

real = infer.write_part

def slow_write(batch, **kwargs):  # defined in __main__: Ray ships it to the workers by value
    out = real(batch, **kwargs)
    time.sleep(600)  # rows staged, never published: the test stops this run
    return out

infer.write_part = slow_write
from jobs.cli import main
main(sys.argv[1:], prog_name="frcnn-jobs")
"""

_SLOW_PRECOMPUTE = """
import sys, time
from pipelines import precompute as pc, storage

real_block = pc.precompute_block
SLOW_S = float(__import__("os").environ.get("SLOW_BLOCK_S", "0"))  # read here: workers lack the variable
FIRST = __import__("os").environ.get("SLOW_FIRST_MARK", "")

def slow_block(batch, **kwargs):  # defined in __main__: Ray ships it (and the constants) to the workers
    import os
    try:  # the first block to run goes at full speed (a shard is staged), every other one waits
        os.close(os.open(FIRST, os.O_CREAT | os.O_EXCL)) if FIRST else None
    except FileExistsError:
        time.sleep(SLOW_S)
    yield from real_block(batch, **kwargs)

def paused_replace(staging, dest, marker_name, marker_obj):
    # the local replace's first step (the old output moved aside), then a pause before the rename
    staging.child(marker_name).write_json(marker_obj)
    run = storage._STAGED_RE.match(staging.name).group("run")
    dest.fs.move(dest.path, storage._aside(dest, run).path)
    print("moved aside", flush=True)
    time.sleep(600)

pc.precompute_block = slow_block
if "--pause-replace" in sys.argv:
    sys.argv.remove("--pause-replace")
    storage._publish_by_rename = paused_replace
from jobs.cli import main
main(sys.argv[1:], prog_name="frcnn-jobs")
"""


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("overlap")
    cfg = tiny_config(num_classes=5, class_names=SYNTH_CLASSES, canvas=128)
    torch.manual_seed(0)
    ckpt = root / "checkpoint.pt"
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), ckpt)
    images = root / "images"
    images.mkdir()
    for k in range(N_IMAGES):
        image, _ = render_image(np.random.default_rng(k), 64, 48)
        image.save(images / f"{k:02d}.jpg")
    return ckpt, images


@pytest.fixture()
def env(ray_session, tmp_path) -> dict[str, str]:
    """The runs join the tests' Ray instance and track into a tmp store."""
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "FRCNN_LEASE_TTL": TTL,
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _start(script: str | None, args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", script, *args] if script else [str(Path(sys.executable).with_name("frcnn-jobs")),
                                                                *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"ended before {what}: {proc.communicate()}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def _line_reader(proc: subprocess.Popen, pattern: str):
    """A check for _wait_for: True once stdout has a line matching ``pattern``."""
    seen: list[str] = []

    def check() -> bool:
        line = proc.stdout.readline()
        seen.append(line)
        return bool(re.search(pattern, line))
    return check


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _runs(tmp_path: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def _refused(result: subprocess.CompletedProcess, out: str, code: int) -> str:
    """One clean line naming the output and its holder, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"Error: {out}: in use by "), line
    return line


def _assert_one_row_per_image(out: str) -> None:
    ids = infer.read_published(out).column("image_id").to_pylist()
    assert sorted(ids) == [f"{k:02d}.jpg" for k in range(N_IMAGES)]  # no duplicate, none missing


# --------------------------------------------------------------------------- infer


def _overlapping_infers(out: str, staged, stop, model_and_images, env, tmp_path) -> tuple[str, str]:
    """A (slowed) holds ``out``; B is refused; C queues with --wait; ``stop(A)``; C takes over.
    Returns A's stderr and C's stdout."""
    ckpt, images = model_and_images
    args = ["infer", "--model", str(ckpt), "--input", str(images), "--output", out, "--incremental",
            "--batch-size", "4", "--experiment", "overlap"]
    a = _start(_SLOW_INFER, args, env, tmp_path)
    c = None
    try:
        part = _wait_for("a staged part file", staged, a)
        [a_run] = [r for r in _runs(tmp_path, "overlap") if r.info.status == "RUNNING"]
        b = subprocess.run([str(Path(sys.executable).with_name("frcnn-jobs")), *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        line = _refused(b, out, 75)
        assert f"infer (MLflow run {a_run.info.run_id}) started " in line and "--wait SECONDS" in line
        c = _start(None, [*args, "--wait", "300"], env, tmp_path)
        _wait_for("C waiting", _line_reader(c, r"in use by infer .*; waiting up to 300 s"), c)
        assert staged() == part  # neither B nor C touched the live run's staging
        a_err = stop(a)
        c_out, c_err = c.communicate(timeout=300)
    finally:
        _stop(a)
        if c is not None:
            _stop(c)
    assert c.returncode == 0, (c_out, c_err)
    assert "Traceback" not in c_err + a_err
    assert f"{N_IMAGES} inputs seen, {N_IMAGES} new, 0 skipped" in c_out, c_out
    _assert_one_row_per_image(out)
    assert len(infer.published_runs(out)) == 1
    statuses = [r.info.status for r in _runs(tmp_path, "overlap")]
    assert statuses[-1] == "FINISHED" and len(statuses) == 2, statuses  # B was refused before any run
    return a_err, c_out


def test_overlapping_infers_locally_a_killed_holder_is_taken_over(model_and_images, env, tmp_path):
    out = tmp_path / "det"

    def staged():
        return sorted(str(p) for p in out.glob("_staging/run=*/part-*.parquet"))

    def kill_9(proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return ""

    _overlapping_infers(str(out), staged, kill_9, model_and_images, env, tmp_path)
    assert not list(out.glob("_staging/*"))  # the killed run's staging and lease: cleaned up
    assert [r.info.status for r in _runs(tmp_path, "overlap")][0] == "RUNNING"  # kill -9: nothing ended it


@pytest.fixture()
def s3(tmp_path, env):
    """moto's S3 server on 127.0.0.1, a bucket, and the environment that points the runs at it."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="frcnn")
        env.update(keys)
        # The tests' Ray workers started without these keys: each run hands them to its tasks as
        # its job's runtime environment (what `ray job submit --runtime-env-json` does).
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": keys}})
        yield client
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def test_overlapping_infers_on_s3_a_sigterm_stops_the_holder(model_and_images, env, tmp_path, s3):
    out = "s3://frcnn/det"

    def keys(prefix: str) -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="frcnn", Prefix=prefix).get("Contents", []))

    def staged():
        return [k for k in keys("det/_staging/") if re.search(r"/run=[^/]+/part-[^/]+\.parquet$", k)]

    def sigterm(proc):
        proc.send_signal(signal.SIGTERM)  # the driver only, as Kubernetes or `timeout` would
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert "interrupted: nothing of this run was published" in err and "--incremental" in err, err
        return err

    _overlapping_infers(out, staged, sigterm, model_and_images, env, tmp_path)
    assert [r.info.status for r in _runs(tmp_path, "overlap")][0] == "KILLED"
    assert not [k for k in keys("det/_staging/") if not k.endswith("/")]  # no staged file, no lease left


# --------------------------------------------------------------------------- precompute


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> str:
    from pipelines.synth import generate

    root = tmp_path_factory.mktemp("voc")
    generate(root, n_images=16, seed=3, min_size=64, max_size=96)
    return str(root)


def _published_output(path: Path) -> None:
    """A stand-in for an earlier run's published output, replaced by ``--overwrite``."""
    path.mkdir()
    (path / "_frcnn_manifest.json").write_text(json.dumps({"rows": 1, "old": True}))
    (path / "shard-old.parquet").write_bytes(b"old")


def test_two_precomputes_to_one_out_and_sigterm(voc, env, tmp_path):
    out = tmp_path / "pre"
    _published_output(out)
    args = ["precompute", "--data-root", voc, "--split", "trainval", "--out", str(out), "--rows-per-shard", "2",
            "--overwrite", "--experiment", "pre-overlap"]
    first = _start(_SLOW_PRECOMPUTE, args, {**env, "SLOW_BLOCK_S": "600", "SLOW_FIRST_MARK": str(tmp_path / "first")},
                   tmp_path)  # never ends by itself
    try:
        shards = _wait_for("a staged shard", lambda: sorted(tmp_path.glob("_staging/pre.*/*.parquet")), first)
        second = subprocess.run([str(Path(sys.executable).with_name("frcnn-jobs")), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        line = _refused(second, str(out), 1)
        [run] = [r for r in _runs(tmp_path, "pre-overlap") if r.info.status == "RUNNING"]
        assert f"precompute (MLflow run {run.info.run_id}) started " in line
        assert all(p.is_file() for p in shards)  # the live run's staging is untouched
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        _stop(first)
    assert first.returncode == 143, (stdout, stderr)
    assert f"precompute interrupted: nothing published to {out}" in stdout
    assert "Rerun with: frcnn-jobs " in stderr and "Traceback" not in stderr
    assert json.loads((out / "_frcnn_manifest.json").read_text())["old"]  # the old output is untouched
    # On a joined cluster a write task still in flight may stage one more shard after the driver
    # deleted its staging (Ray ends the tasks once the driver is gone): the lease is released, and
    # the next run cleans what is left.
    assert not list(tmp_path.glob("_staging/*.lease"))
    lease.claim(str(out), storage.new_run_name()).release()
    assert not (tmp_path / "_staging").exists()
    statuses = {r.info.run_id: r.info.status for r in _runs(tmp_path, "pre-overlap")}
    assert statuses[run.info.run_id] == "KILLED"


def test_a_replace_interrupted_keeps_the_old_output_aside_until_its_owner_is_dead(voc, env, tmp_path):
    out = tmp_path / "pre"
    _published_output(out)
    args = ["precompute", "--data-root", voc, "--split", "trainval", "--out", str(out), "--rows-per-shard", "8",
            "--overwrite", "--experiment", "replace", "--pause-replace"]
    owner = _start(_SLOW_PRECOMPUTE, args, env, tmp_path)
    try:
        _wait_for("the old output moved aside", _line_reader(owner, "moved aside"), owner)
        [aside] = list(tmp_path.glob("_staging/pre.*.old"))
        assert not out.exists()
        # another run starts while the replace's owner lives: refused, the old output left aside
        with pytest.raises(lease.LeaseHeld):
            lease.claim(str(out), storage.new_run_name())
        assert aside.is_dir() and not out.exists()
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # the replace is interrupted for good
        owner.wait(timeout=30)
    lease.claim(str(out), storage.new_run_name()).release()  # what the next run does first
    assert json.loads((out / "_frcnn_manifest.json").read_text())["old"] and (out / "shard-old.parquet").is_file()
    assert not aside.exists() and not (tmp_path / "_staging").exists()
