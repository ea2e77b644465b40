"""jobs.tracking against a real SQLite MLflow store: job runs end with the status of what
happened, experiments open on training runs, run names say what ran, and metrics logged during
a tracking outage all reach the run once the store answers again."""

from __future__ import annotations

import time
import warnings

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs import tracking

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tracking_uri, monkeypatch):
    """The shared fresh store, named only by the ``tracking_uri`` each call passes (no environment
    variable to fall back on)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking_uri


def test_job_run_finished_with_name_tags_params_and_experiment_kind(store):
    with tracking.job_run("evaluate", run_name="evaluate-frcnn-v1-test", experiment="t-finished",
                          tracking_uri=store, tags={"frcnn.split": "test", "frcnn.empty": None},
                          params={f"p{i:03d}": i for i in range(250)} | {"none": None}) as run:
        mlflow.log_metric("map50", 0.5)
    got = MlflowClient(store).get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "evaluate-frcnn-v1-test"
    assert got.data.tags["frcnn.job"] == "evaluate" and got.data.tags["frcnn.split"] == "test"
    assert got.data.tags["frcnn.empty"] == ""
    # 251 params: more than one of MLflow's 100-param batches, all there, values as strings.
    assert len(got.data.params) == 251
    assert got.data.params["p000"] == "0" and got.data.params["p249"] == "249" and got.data.params["none"] == ""
    assert got.data.metrics == {"map50": 0.5}
    exp = MlflowClient(store).get_experiment_by_name("t-finished")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert got.info.experiment_id == exp.experiment_id
    assert mlflow.active_run() is None


def test_job_run_failed_on_error_and_killed_on_interrupt(store):
    with pytest.raises(ValueError, match="bad input"):
        with tracking.job_run("precompute", experiment="t-status", tracking_uri=store) as run:
            raise ValueError("bad input")
    failed = run.info.run_id
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run("train", experiment="t-status", tracking_uri=store) as run:
            raise KeyboardInterrupt
    killed = run.info.run_id
    client = MlflowClient(store)
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(failed).data.tags["frcnn.job"] == "precompute"
    assert mlflow.active_run() is None


def test_job_run_resumes_the_same_run_and_keeps_its_params(store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run("train", run_name="train-tiny-synth-1w", experiment="t-resume", tracking_uri=store,
                              params={"train.epochs": 4}) as run:
            raise KeyboardInterrupt
    run_id = run.info.run_id
    # The resumed job passes other params (a changed command line): the run keeps the first ones.
    with tracking.job_run("train", run_id=run_id, experiment="t-resume", tracking_uri=store,
                          params={"train.epochs": 9}, tags={"frcnn.resumed": 1}) as again:
        assert again.info.run_id == run_id
    got = MlflowClient(store).get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "train-tiny-synth-1w"
    assert got.data.params == {"train.epochs": "4"} and got.data.tags["frcnn.resumed"] == "1"


def test_existing_experiment_gets_the_training_kind(store):
    client = MlflowClient(store)
    exp_id = client.create_experiment("made-by-plain-mlflow")
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags
    tracking.setup(store, "made-by-plain-mlflow")
    assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_run_names_say_what_ran():
    assert tracking.train_run_name("tiny", "synth", 1) == "train-tiny-synth-1w"
    assert tracking.train_run_name("vgg16", "voc0712", 8) == "train-vgg16-voc0712-8w"
    assert tracking.evaluate_run_name("models:/frcnn-demo/1", "test") == "evaluate-frcnn-demo-v1-test"
    assert tracking.infer_run_name("models:/frcnn-demo@champion") == "infer-frcnn-demo@champion"
    assert tracking.infer_run_name("0123456789abcdef0123456789abcdef") == "infer-01234567"
    assert tracking.infer_run_name("/ckpt/checkpoint_000012/model.pt") == "infer-checkpoint_000012"
    assert tracking.precompute_run_name("synth", "train") == "precompute-synth-train"
    assert (tracking.experiment_url("http://127.0.0.1:5000/", "3")
            == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")


def _outage(monkeypatch, buffer: tracking.MetricBuffer, seconds: float) -> dict:
    """Make the buffer's store refuse writes for ``seconds`` (the fault injected from the test:
    a server that does not answer), counting the refused calls."""
    real = buffer.client.log_batch
    until = time.monotonic() + seconds
    calls = {"refused": 0}

    def log_batch(*args, **kwargs):
        if time.monotonic() < until:
            calls["refused"] += 1
            raise ConnectionError("tracking server unreachable (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(buffer.client, "log_batch", log_batch)
    return calls


def test_metric_buffer_writes_every_step_logged_during_an_outage(store, monkeypatch):
    with tracking.job_run("train", experiment="t-outage", tracking_uri=store) as run:
        buffer = tracking.MetricBuffer(run.info.run_id, store, retry_every=0.2, flush_every=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calls = _outage(monkeypatch, buffer, seconds=1.5)
            start = time.monotonic()
            for step in range(1, 301):
                buffer.log({"loss_total": 1.0 / step, "lr": 0.01, "bad": float("nan")}, step=step)
                time.sleep(0.01)
            logging_took = time.monotonic() - start
            assert buffer.close(timeout=30)
    assert calls["refused"] >= 2  # the outage was real and retried
    assert logging_took < 3 + 1.5  # log() never waited on the store
    client = MlflowClient(store)
    history = client.get_metric_history(run.info.run_id, "loss_total")
    assert sorted(m.step for m in history) == list(range(1, 301))  # every step once
    assert {m.step: m.value for m in history}[7] == pytest.approx(1 / 7)
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 300
    assert client.get_metric_history(run.info.run_id, "bad") == []
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("cannot write metrics" in m for m in messages) == 1  # once per outage, not per call
    assert sum("answers again" in m for m in messages) == 1


def test_metric_buffer_is_bounded_and_says_what_it_dropped(store, monkeypatch):
    with tracking.job_run("train", experiment="t-bounded", tracking_uri=store) as run:
        buffer = tracking.MetricBuffer(run.info.run_id, store, max_pending=10, retry_every=0.2, flush_every=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _outage(monkeypatch, buffer, seconds=1.0)
            for step in range(30):
                buffer.log({"x": step}, step=step)
            assert buffer.pending == 10 and buffer.dropped == 20
            assert not buffer.close(timeout=30)  # written what it kept, but reports the loss
    steps = sorted(m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "x"))
    assert steps == list(range(20, 30))  # the newest are kept
    assert any("20 dropped" in str(w.message) for w in caught)


@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    """A real MLflow tracking server (MLflow's own Flask app over HTTP, in a thread of this
    process) that the test can stop and start again on the same port."""
    import socket
    import threading

    from werkzeug.serving import make_server

    monkeypatch.setenv("_MLFLOW_SERVER_FILE_STORE", f"sqlite:///{tmp_path / 'server.db'}")
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    # A refused connection fails at once instead of MLflow's client retrying for minutes: the
    # buffer's own retries are what is tested. (The first request creates the store's tables.)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    from mlflow.server import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Server:
        url = f"http://127.0.0.1:{port}"

        def start(self):
            self.http = make_server("127.0.0.1", port, app, threaded=True)
            self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
            self.thread.start()

        def stop(self):
            self.http.shutdown()
            self.http.server_close()
            self.thread.join()

    server = Server()
    server.start()
    yield server
    server.stop()


def test_metric_buffer_across_a_real_server_outage(tracking_server):
    with tracking.job_run("train", run_name="train-tiny-synth-1w", experiment="t-server",
                          tracking_uri=tracking_server.url) as run:
        buffer = tracking.MetricBuffer(run.info.run_id, tracking_server.url, retry_every=0.3, flush_every=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 51):
                buffer.log({"loss_total": float(step)}, step=step)
            assert buffer.flush()
            tracking_server.stop()  # the server goes away mid-training
            for step in range(51, 151):
                buffer.log({"loss_total": float(step)}, step=step)
                time.sleep(0.02)
            assert buffer.pending > 0 and not buffer.flush()  # nothing reaches a stopped server
            tracking_server.start()  # back on the same address
            for step in range(151, 201):
                buffer.log({"loss_total": float(step)}, step=step)
            assert buffer.close(timeout=30)
    history = MlflowClient(tracking_server.url).get_metric_history(run.info.run_id, "loss_total")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 201)]
    assert MlflowClient(tracking_server.url).get_run(run.info.run_id).info.status == "FINISHED"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("cannot write metrics" in m for m in messages) == 1
    assert sum("answers again" in m for m in messages) == 1
