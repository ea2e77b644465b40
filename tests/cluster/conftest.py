"""The cluster tier: infra/'s shape on 127.0.0.1 with the real engines (infra/rehearsal/).

One module-scoped fixture per service (``postgres``, ``s3`` with its cuttable relays,
``mlflow_server``, ``ray_cluster``), then the infra/README jobs as fixtures that build on each
other (``raw_data`` -> ``precomputed`` -> ``train_job`` -> ``trained_model`` -> ``champion``). A
fault test asks for what it needs, so each runs alone (``pytest tests/cluster/test_rehearsal.py::
test_fault_b``); run together, the module shares one cluster and one training job. Everything is
stopped when the module ends (``Stack.close``); the temp folder and its logs are kept when a test
failed or ``FRCNN_REHEARSAL_KEEP=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from infra.rehearsal.checks import check_isolated, metric_steps, run_ids
from infra.rehearsal.commands import FJ, PRECOMPUTED, RawData, precompute_cmd
from infra.rehearsal.stack import (
    BATCH,
    CONFIG,
    EPOCHS,
    EXPERIMENT,
    IMAGES,
    MODEL_NAME,
    VENV_BIN,
    Stack,
    check,
    log,
    wait_for,
)

NEEDS = ("initdb", "pg_ctl", "pg_dump", "createdb") + (("runuser",) if os.geteuid() == 0 else ())
MISSING = [tool for tool in NEEDS if shutil.which(tool) is None]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/cluster/" in item.nodeid and MISSING:
            item.add_marker(pytest.mark.skip(reason=f"PostgreSQL server tools not on the PATH: {MISSING}"))


# ------------------------------------------------------------------------------------ services


@pytest.fixture(scope="module")
def stack(request):
    """The run's temp folder, credentials and process groups; stops everything at the end."""
    st = Stack(keep=os.environ.get("FRCNN_REHEARSAL_KEEP") == "1")
    failed_before = request.session.testsfailed
    log(f"temp folder {st.tmp}, logs in {st.logs}")
    st.start_sampler()
    t0 = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)

    def terminated(signum, frame):  # `timeout`, CI cancelling: still stop everything
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    # This process talks to the head too (job status, logs): it holds the token, as a workstation would.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", st.ray_token)
        mp.delenv("RAY_ADDRESS", raising=False)
        try:
            yield st
        finally:
            with contextlib.suppress(Exception):
                st.summary["machine"] = st.cpu_report(time.monotonic() - t0)
            if request.session.testsfailed > failed_before:
                st.keep = True
            summary = json.dumps(st.summary, indent=2, default=str)
            with contextlib.suppress(OSError):
                (st.logs / "summary.json").write_text(summary)
            log(f"summary: {summary}")
            st.close()
            signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def postgres(stack):
    stack.start_postgres()
    log("postgres up")
    return stack


@pytest.fixture(scope="module")
def s3(stack):
    """moto's S3 server with buckets ``mlflow`` and ``frcnn``, and the relays the nodes reach it by."""
    stack.start_s3()
    log("s3 up")
    return stack


@pytest.fixture(scope="module")
def _mlflow_started(postgres, s3):
    stack = postgres
    stack.start_mlflow()  # migrates the fresh schema while Ray starts
    return stack


@pytest.fixture(scope="module")
def mlflow_server(_mlflow_started):
    stack = _mlflow_started
    wait_for("the tracking server", stack.mlflow_healthy, 180)
    stack.create_mlflow_users()  # the admin creates the jobs', the reader's and inference's identities
    log("mlflow up (basic-auth)")
    return stack


@pytest.fixture(scope="module")
def ray_cluster(_mlflow_started):
    """A head with 0 CPUs and two 3-CPU worker nodes, token auth on, isolated by --temp-dir."""
    st = _mlflow_started
    with st.timed("ray cluster"):
        st.ray_start("head", head=True, cpus=0)
        # The head's dashboard (a dozen Python processes) starts after `ray start` returns; a raylet
        # registering during that burst on a loaded machine misses Ray's 30 s window.
        wait_for("the job server", st.job_server_up, 60, every=1.0)
        log("ray head up")
        # Logical CPUs: 2 for the rank, the rest for Ray Data beside it (force one rank a node).
        # One after the other: two raylets registering at once on a loaded machine miss Ray's
        # 30 s registration window more often than one.
        st.ray_start("w1", head=False, cpus=3)
        st.ray_start("w2", head=False, cpus=3)
        wait_for("2 worker nodes", lambda: st.alive_worker_nodes() == 2, 60)
        log("ray workers up")
        st.observed["isolation"] = check_isolated(st)
    return st


# ------------------------------------------------------------------------------------ the jobs


@pytest.fixture(scope="module")
def raw_data(ray_cluster, mlflow_server) -> RawData:
    """`synth` as a job, then the `aws s3 sync` step of infra/README into s3://frcnn/raw/."""
    st = ray_cluster
    with st.timed("synth + upload"):
        raw = st.tmp / "raw"
        st.run_job("synth", f"{FJ} synth --out {raw} --images {IMAGES} --seed 0 --min-size 96 --max-size 160")
        for p in (p for p in raw.rglob("*") if p.is_file()):
            st.s3.upload_file(str(p), "frcnn", f"raw/{p.relative_to(raw).as_posix()}")
        voc = next(p for p in raw.rglob("VOC2007") if p.is_dir()).relative_to(raw).as_posix()
        data_root = f"s3://frcnn/raw/{voc.rsplit('/', 1)[0]}" if "/" in voc else "s3://frcnn/raw"
        splits = {s: len((raw / voc / "ImageSets" / "Main" / f"{s}.txt").read_text().split())
                  for s in ("train", "val", "trainval", "test")}
    st.observed["splits"] = splits
    return RawData(raw, voc, data_root, splits)


@pytest.fixture(scope="module")
def precompute_job(ray_cluster, raw_data) -> str:
    """The three splits chained in one job, as the precompute RayJob does (`ray job submit`
    quotes a bare `&&`, hence `bash -c`); submitted, not awaited (fault c runs beside it)."""
    chain = " && ".join(precompute_cmd(raw_data, s, PRECOMPUTED[s]) for s in ("train", "val", "test"))
    ray_cluster.submit("precompute", f"bash -c {shlex.quote(chain)}")
    ray_cluster.t_precompute = time.monotonic()
    return "precompute"


@pytest.fixture(scope="module")
def precomputed(ray_cluster, raw_data, precompute_job) -> dict[str, str]:
    """The three splits published: a manifest with every row of the split, shards beside it."""
    st = ray_cluster
    status, logs = st.wait_job(precompute_job, 600)
    st.summary["seconds"]["precompute"] = round(time.monotonic() - st.t_precompute, 1)
    check(status == "SUCCEEDED", f"precompute {status}:\n{logs[-4000:]}")
    for s, uri in PRECOMPUTED.items():
        key = uri[len("s3://frcnn/"):]
        manifest = json.loads(st.get("frcnn", f"{key}/_frcnn_manifest.json"))
        check(manifest["rows"] == raw_data.splits[s], f"{uri}: {manifest['rows']} rows, split has {raw_data.splits[s]}")
        check(any(k.endswith(".parquet") for k in st.keys("frcnn", key + "/")), f"{uri}: no shards")
    return PRECOMPUTED


@dataclass
class TrainJob:
    """The training job (2 ranks, one per worker node) and what is watched while it runs."""

    st: Stack
    run_id: str
    steps_per_epoch: int
    total: int
    t_start: float
    epochs_seen: list[tuple[float, int]] = field(default_factory=list)  # (time, epoch) of reported checkpoints
    stop_watching: threading.Event = field(default_factory=threading.Event)
    result: tuple[str, str] | None = None

    def last_step(self) -> int:
        steps = metric_steps(self.st, self.run_id, "train/loss_total")
        return steps[-1] if steps else 0

    def checkpoints(self) -> list[str]:
        return sorted({k.split("/")[2] for k in self.st.keys("frcnn", f"ray-results/train-{self.run_id}/")
                       if k.split("/")[2].startswith("checkpoint_")})

    def running(self) -> bool:
        return self.st.job_status("train") == "RUNNING"

    def watch_snapshot(self) -> None:
        """Ray Train's checkpoint manager snapshot names the latest checkpoint's reported metrics:
        watched through the run, its epochs must only go up. A group restarted from scratch would
        report epoch 0 again; restarted from the last checkpoint, it reports the next epoch."""
        prefix = f"ray-results/train-{self.run_id}/"
        while not self.stop_watching.is_set():
            with contextlib.suppress(Exception):
                for key in self.st.keys("frcnn", prefix):
                    if key.endswith("snapshot.json"):
                        latest = json.loads(self.st.get("frcnn", key)).get("latest_checkpoint_result") or {}
                        epoch = latest.get("metrics", {}).get("epoch")
                        if epoch is not None and (not self.epochs_seen or self.epochs_seen[-1][1] != epoch):
                            self.epochs_seen.append((time.monotonic(), int(epoch)))
            self.stop_watching.wait(0.3)

    def finish(self) -> tuple[str, str]:
        if self.result is None:
            self.result = self.st.wait_job("train", 400)
            self.stop_watching.set()
            self.st.summary["seconds"]["train"] = round(time.monotonic() - self.t_start, 1)
        return self.result


@pytest.fixture(scope="module")
def train_job(ray_cluster, precomputed, raw_data) -> TrainJob:
    """`frcnn-jobs train --workers 2 --cpus-per-worker 2 --storage-path s3://...`, submitted; the
    fault tests act on it while it runs."""
    st = ray_cluster
    cmd = (f"{FJ} train --data {precomputed['train']} --val-data {precomputed['val']} --config {CONFIG} "
           f"--workers 2 --gpus-per-worker 0 --cpus-per-worker 2 --storage-path s3://frcnn/ray-results "
           f"--experiment {EXPERIMENT} --model-name {MODEL_NAME} --progress-every 10")
    t0 = time.monotonic()
    st.submit("train", cmd)
    run_id = wait_for("the train run", lambda: (r := run_ids(st, "train")) and r[-1][0], 120)
    steps_per_epoch = raw_data.splits["train"] // (2 * BATCH)
    job = TrainJob(st, run_id, steps_per_epoch, steps_per_epoch * EPOCHS, t0)
    threading.Thread(target=job.watch_snapshot, daemon=True).start()
    yield job
    job.stop_watching.set()


@pytest.fixture(scope="module")
def trained_model(train_job) -> TrainJob:
    """The training job ended SUCCEEDED with one FINISHED run."""
    status, logs = train_job.finish()
    check(status == "SUCCEEDED", f"train {status}:\n{logs[-5000:]}")
    (run,) = run_ids(train_job.st, "train")
    check(run == (train_job.run_id, "FINISHED"), f"train run: {run}")
    return train_job


@pytest.fixture(scope="module")
def champion(trained_model, raw_data) -> str:
    """Version 1 evaluated on the test split and promoted to @champion from the client (infra/README
    steps 7-8); returns the model URI the scheduled inference serves."""
    st = trained_model.st
    with st.timed("evaluate"):
        st.run_job("evaluate", f"{FJ} evaluate --model models:/{MODEL_NAME}/1 --dataset voc "
                               f"--data-root {raw_data.data_root} --split test --year 2007 --concurrency 1 "
                               f"--experiment {EXPERIMENT}")
        runs = run_ids(st, "evaluate")
        check(len(runs) == 1 and runs[0][1] == "FINISHED", f"evaluate runs: {runs}")
        m = st.sql("SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'map50'", (runs[0][0],))
        check(m, "no map50 in the evaluation run")
        st.observed["evaluate"] = {"map50": m[0][0]}
    with st.timed("promote"):
        # As infra/README: from the workstation, with MLFLOW_TRACKING_URI pointing at the server.
        st.run([str(VENV_BIN / FJ), "promote", f"models:/{MODEL_NAME}/1", "--alias", "champion",
                "--if-better-than", "champion", "--metric", "map50"], env=st.client_env())
        alias = st.sql("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'",
                       (MODEL_NAME,))
        check(alias == [(1,)], f"champion alias: {alias}")
    return f"models:/{MODEL_NAME}@champion"
