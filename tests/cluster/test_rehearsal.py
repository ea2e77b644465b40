"""The cluster rehearsal (`make cluster-rehearsal`; `make test` runs it too): PostgreSQL, an MLflow
server with proxied S3 artifacts, moto's S3 and a three-node Ray cluster with token auth on
127.0.0.1 (tests/cluster/conftest.py, one fixture per service), the infra/README jobs through
`ray job submit`, and four faults, one test each. Every assertion reads what the engines hold:
PostgreSQL rows, objects in the buckets, Ray job states."""

from __future__ import annotations

import signal
import time

import pytest

from infra.rehearsal import auth
from infra.rehearsal.checks import check_loopback, check_secrets, metric_steps, published, published_ids, run_ids
from infra.rehearsal.commands import PRECOMPUTED, precompute_cmd
from infra.rehearsal.relay import is_staged_shard_upload
from infra.rehearsal.stack import MODEL_NAME, VENV_BIN, log, wait_for

pytestmark = pytest.mark.cluster


def test_cluster_is_isolated_and_token_guarded(ray_cluster):
    """A client without the token is refused; a plain `ray.init()` elsewhere cannot find the cluster."""
    st = ray_cluster
    res = st.run([str(VENV_BIN / "ray"), "job", "list", "--address", st.ray_address], env=st.base_env(),
                 check_rc=False)
    assert res.returncode != 0, "the Ray head accepted a job request without the token"
    iso = st.observed["isolation"]
    assert iso["address_file"].endswith(f":{st.gcs_port}")
    assert iso["default_address_file"] is None or not iso["default_address_file"].endswith(f":{st.gcs_port}")


def test_fault_c_s3_unreachable_during_precompute(ray_cluster, raw_data, precompute_job):
    """A precompute whose S3 endpoint (its own relay, passed in its runtime env) goes away after its
    first staged shard is stored, beside the main precompute: the job fails with one line naming the
    output URI, and nothing is published. The relay holds the job's S3 traffic from the moment that
    shard is stored, so the job cannot publish before the cut, however fast the machine."""
    st = ray_cluster
    cut_out = "s3://frcnn/precomputed/synth-trainval"
    staged = "precomputed/_staging/synth-trainval."
    st.fault_relay.hold_after(is_staged_shard_upload)
    st.submit("precompute-s3-down", precompute_cmd(raw_data, "trainval", cut_out, on_error="skip"),
              env_vars={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{st.s3_fault_port}"})
    wait_for("fault c's precompute to stage a shard",
             lambda: st.fault_relay.held.is_set()
             or st.job_status("precompute-s3-down") in ("SUCCEEDED", "FAILED", "STOPPED"), 400, every=0.1)
    assert st.fault_relay.held.is_set(), \
        f"fault c's precompute ended {st.job_status('precompute-s3-down')} before staging a shard"
    st.fault_relay.cut()
    staged_at_cut = [k for k in st.keys("frcnn", staged) if k.endswith(".parquet")]
    status, logs = st.wait_job("precompute-s3-down", 300)
    tail = [ln for ln in logs.splitlines() if ln.strip()][-3:]
    st.observed["fault_c"] = {"status": status, "staged_shards_at_cut": len(staged_at_cut), "last_lines": tail,
                              "held_after": st.fault_relay.trigger_line.decode("latin-1")}
    assert staged_at_cut, "no staged shard in the bucket although the relay saw one stored"
    assert status == "FAILED", f"precompute with S3 unreachable ended {status}"
    published_keys = st.keys("frcnn", cut_out[len("s3://frcnn/"):] + "/")
    assert not published_keys, f"something was published at {cut_out}: {published_keys[:5]}"
    # A clear error: the job's last line names the URI (not a traceback's bucket/key pair).
    assert tail and tail[-1].startswith("Error:") and cut_out in tail[-1], tail
    assert "storage error, nothing published" in tail[-1], tail
    # Its run is FAILED in the store; its staging folder stays (the next run of that output deletes it).
    assert any(s == "FAILED" for _, s in run_ids(st, "precompute"))


def test_precompute_publishes_every_split(precomputed, ray_cluster):
    runs = run_ids(ray_cluster, "precompute")
    assert sorted(s for _, s in runs).count("FINISHED") == 3, runs
    assert set(precomputed) == set(PRECOMPUTED)


def test_fault_a_worker_node_killed_mid_training(train_job):
    """SIGKILL to a worker node's `ray start` process group (raylet, agents, the rank on it) once a
    checkpoint is in the bucket, then a replacement node, as KubeRay replaces a pod: the group
    restarts from a checkpoint at least as new as the one in the bucket at the kill."""
    job, st = train_job, train_job.st
    wait_for("a checkpoint and steps past it",
             lambda: job.checkpoints() and job.last_step() >= job.steps_per_epoch + 3 or not job.running(), 300)
    assert job.running(), "training ended before the node could be killed"
    kill_step, ckpts_before = job.last_step(), job.checkpoints()
    epoch_at_kill = job.epochs_seen[-1][1] if job.epochs_seen else -1
    log(f"killing worker node w2 at step {kill_step} (checkpoints: {len(ckpts_before)})")
    st.kill_group("ray-w2", signal.SIGKILL)
    t_kill = time.monotonic()
    st.ray_start("w3", head=False, cpus=3)  # KubeRay would start a new pod
    # The restarted group's rank 0 records the step of the checkpoint it loaded (resumed_from_step).
    resumed = wait_for("the group to resume from a checkpoint",
                       lambda: metric_steps(st, job.run_id, "system/perf/resumed_from_step") or not job.running(), 300)
    assert job.running(), f"training ended after the node kill: {st.job_status('train')}"
    after = wait_for("a checkpoint reported after the restart",
                     lambda: [e for t, e in job.epochs_seen if t > t_kill] or not job.running(), 300)
    st.observed["fault_a"] = {"killed_at_step": kill_step, "checkpoints_before": len(ckpts_before),
                              "epoch_at_kill": epoch_at_kill, "resumed_from_steps": resumed}
    at_kill = (epoch_at_kill + 1) * job.steps_per_epoch
    assert all(s >= at_kill for s in resumed), f"resumed from step(s) {resumed}; the checkpoint at the kill: {at_kill}"
    assert after is True or after[0] > epoch_at_kill, \
        f"first checkpoint after the kill is epoch {after[:1]}, last before it {epoch_at_kill}"


def test_fault_b_tracking_server_down_mid_training(train_job):
    """The tracking server SIGKILLed for 20 s mid-training, then the same command on the same port:
    training goes on, rank 0's metrics wait in jobs/tracking.MetricBuffer, and no step is lost."""
    job, st = train_job, train_job.st
    wait_for("training steps", lambda: job.last_step() >= 2 or not job.running(), 300)
    assert job.running(), "training ended before the tracking server could be stopped"
    st.kill_group("mlflow", signal.SIGKILL)
    pre_outage = set(metric_steps(st, job.run_id, "train/loss_total"))  # what reached the store before it
    outage_start = max(pre_outage)
    log(f"tracking server stopped at step {outage_start}")
    time.sleep(20)
    steps_during = job.last_step()
    assert job.running(), "training ended during the tracking outage"
    st.start_mlflow()
    wait_for("the tracking server back", st.mlflow_healthy, 120)
    status, logs = job.finish()
    assert status == "SUCCEEDED", f"train {status}:\n{logs[-5000:]}"
    assert steps_during == outage_start, "metrics arrived while the server was down?"
    rows = st.sql("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss_total' "
                  "GROUP BY step ORDER BY step", (job.run_id,))
    steps = [r[0] for r in rows]
    missing = sorted(set(range(1, job.total + 1)) - set(steps))
    st.observed["fault_b"] = {"outage_from_step": outage_start, "missing_steps": missing,
                              "last_step": steps[-1] if steps else None, "total_steps": job.total}
    assert pre_outage <= set(steps), f"steps lost from before the outage: {sorted(pre_outage - set(steps))}"
    assert not missing, f"steps missing from the run (logged during the outage?): {missing}"


def test_training_run_is_complete(trained_model):
    """One FINISHED run; every step logged exactly once; checkpoint epochs only go up; validation
    once per epoch; checkpoints in the bucket, the model's artifacts behind the server's proxy, one
    registered version."""
    job, st = trained_model, trained_model.st
    rows = st.sql("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss_total' "
                  "GROUP BY step ORDER BY step", (job.run_id,))
    assert [r[0] for r in rows] == list(range(1, job.total + 1))
    assert not [r[0] for r in rows if r[1] > 1], "steps logged twice"
    epochs = [e for _, e in job.epochs_seen]
    assert epochs == sorted(set(epochs)), f"checkpoint epochs went back (restart from scratch?): {epochs}"
    val_rows = st.sql("SELECT step, count(*) FROM metrics WHERE run_uuid = %s AND key = 'val/map50' "
                      "GROUP BY step", (job.run_id,))
    assert val_rows and all(c == 1 for _, c in val_rows), f"validation logged twice: {val_rows}"
    assert job.checkpoints(), "no checkpoint in the bucket"
    art = st.keys("mlflow")
    assert any("/checkpoints/final/" in k for k in art), "no checkpoints/final artifact in s3://mlflow"
    assert any(k.endswith("MLmodel") for k in art), "no MLmodel artifact in s3://mlflow"
    assert st.sql("SELECT version FROM model_versions WHERE name = %s", (MODEL_NAME,)) == [(1,)]
    st.observed["train"] = {"run_id": job.run_id, "steps_logged": len(rows), "checkpoints": len(job.checkpoints())}


def test_fault_d_inference_stopped_mid_write(ray_cluster, champion, raw_data):
    """`stop_job` (the REST call behind `ray job stop`) once the infer run's staging folder exists:
    the job ends STOPPED with nothing published; the next run publishes all inputs in one partition,
    the one after finds nothing new, and the published partitions hold every input exactly once."""
    st = ray_cluster
    infer_cmd = (f"frcnn-jobs infer --model {champion} --input s3://frcnn/incoming --output s3://frcnn/detections "
                 f"--incremental --experiment frcnn-infer --batch-size 2")
    with st.timed("fault d + infer twice"):
        images = sorted(p for p in (raw_data.local / raw_data.voc / "JPEGImages").iterdir())
        for p in images:
            st.s3.upload_file(str(p), "frcnn", f"incoming/{p.name}")
        # Inference runs as its own identity (the CronJob's frcnn-mlflow-infer Secret): it reads the
        # registry and logs its own runs, and cannot move @champion (test_tracking_server_permissions).
        as_infer = st.mlflow_creds.env(auth.INFER)
        st.submit("infer-killed", infer_cmd, env_vars=as_infer)
        wait_for("infer to open its partition",
                 lambda: any("/_staging/" in "/" + k for k in st.keys("frcnn", "detections/"))
                 or st.job_status("infer-killed") not in ("RUNNING", "PENDING"), 300, every=0.05)
        staged_at_stop = [k for k in st.keys("frcnn", "detections/") if "_staging/" in k]
        stopped = st.jobs.stop_job("infer-killed")
        status, _ = st.wait_job("infer-killed", 120)
        st.observed["fault_d"] = {"status": status, "stop_accepted": stopped, "staged_at_stop": staged_at_stop}
        assert staged_at_stop, "the infer job ended before its partition was opened"
        assert status == "STOPPED", f"the infer job was not stopped mid-write (it ended {status})"
        assert published(st, "detections") == [], f"a partition is visible: {published(st, 'detections')}"
        st.run_job("infer-1", infer_cmd, env_vars=as_infer)
        assert len(published(st, "detections")) == 1
        st.run_job("infer-2", infer_cmd, env_vars=as_infer)
        parts = published(st, "detections")
        ids = published_ids(st, parts)
        twice = sorted({i for i in ids if ids.count(i) > 1})
        assert sorted(ids) == sorted(p.name for p in images), f"{len(ids)} ids for {len(images)} inputs; twice: {twice}"
        runs = run_ids(st, "infer")
        st.observed["infer"] = {"partitions": parts, "runs": runs}
        assert len([r for r in runs if r[1] == "FINISHED"]) == 2, runs


def test_tracking_server_permissions(ray_cluster, trained_model, champion):
    """basic-auth on the real server: anonymous -> 401; the read-only identity can browse but gets
    403 on logging into a run and on moving @champion; the inference identity cannot promote; the
    jobs' identity (which registered the model) can."""
    st, uri, creds = ray_cluster, ray_cluster.mlflow_uri, ray_cluster.mlflow_creds
    as_user = {u: (u, creds.users[u]) for u in creds.users}
    search = ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 10})
    log_metric = ("POST", "/api/2.0/mlflow/runs/log-metric",
                  {"run_id": trained_model.run_id, "key": "intruder", "value": 1.0, "timestamp": 0, "step": 0})
    promote = ("POST", "/api/2.0/mlflow/registered-models/alias",
               {"name": MODEL_NAME, "alias": "champion", "version": "1"})
    seen = {
        "anonymous search": auth.request(uri, *search)[0],
        "anonymous log": auth.request(uri, *log_metric)[0],
        "reader search": auth.request(uri, *search, auth=as_user[auth.READER])[0],
        "reader get model": auth.request(uri, "GET", f"/api/2.0/mlflow/registered-models/get?name={MODEL_NAME}",
                                         auth=as_user[auth.READER])[0],
        "reader log": auth.request(uri, *log_metric, auth=as_user[auth.READER])[0],
        "reader promote": auth.request(uri, *promote, auth=as_user[auth.READER])[0],
        "infer get model": auth.request(uri, "GET", f"/api/2.0/mlflow/registered-models/get?name={MODEL_NAME}",
                                        auth=as_user[auth.INFER])[0],
        "infer promote": auth.request(uri, *promote, auth=as_user[auth.INFER])[0],
        "wrong password": auth.request(uri, *search, auth=(auth.READER, "not-the-password"))[0],
        "jobs promote": auth.request(uri, *promote, auth=as_user[auth.JOBS])[0],
    }
    st.observed["permissions"] = seen
    assert seen == {"anonymous search": 401, "anonymous log": 401, "reader search": 200, "reader get model": 200,
                    "reader log": 403, "reader promote": 403, "infer get model": 200, "infer promote": 403,
                    "wrong password": 401, "jobs promote": 200}, seen
    assert st.sql("SELECT count(*) FROM metrics WHERE key = 'intruder'") == [(0,)]


def test_no_secret_anywhere_and_loopback_only(champion, ray_cluster):
    """After the jobs: dumps of both MLflow databases (every table), every object in both buckets and
    every job's log hold none of the run's AWS keys, Ray token, MLflow passwords or Flask key; the
    services listen on 127.0.0.1 only."""
    st = ray_cluster
    scanned = check_secrets(st)
    assert scanned["objects_scanned"] > 20
    listening = check_loopback(st)
    for name in ("postgres", "mlflow", "s3", "ray-dashboard"):
        assert listening[name] == "127.0.0.1"
    st.observed["secrets"], st.observed["listening"] = scanned, listening
