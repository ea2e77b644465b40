"""pipelines.lease on the local filesystem: one live holder per destination, takeover only of an
expired lease (heartbeat too old, or an owner pid that is gone), cleanup that never touches a live
run's staging or ``.old`` folder, a holder that lost its lease publishes nothing, and the infer
commit that refuses rows another run published meanwhile. Owners are real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import lease, storage
from pipelines.storage import Location

MARKER = "_MARKER"

_HOLD = """
import sys, time
from pipelines import lease, storage
dest, run = sys.argv[1], sys.argv[2]
held = lease.claim(dest, run)
held.staging.create_dir()
held.staging.child("part.parquet").write_bytes(b"live")
print("held", flush=True)
time.sleep(600)
"""


def _owner(dest: Path, run: str) -> subprocess.Popen:
    """A real process that claims ``dest`` for ``run``, stages a file, and lives until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(dest), run], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def short_ttl(monkeypatch):
    monkeypatch.setenv(lease.TTL_ENV, "2")


def test_one_holder_refused_while_alive_free_after_release(tmp_path):
    dest = Location.of(tmp_path / "out")
    first = lease.claim(dest, storage.new_run_name())
    lease.set_owner("infer", "abc123")
    try:
        time.sleep(2.5)  # longer than the time-to-live: the heartbeat keeps it live
        with pytest.raises(lease.LeaseHeld) as refused:
            lease.claim(dest, storage.new_run_name())
        text = str(refused.value)
        assert text.startswith(f"{dest.shown}: in use by infer (MLflow run abc123) started ")
        assert f"pid {os.getpid()}" in text and "\n" not in text
        t0 = time.monotonic()
        with pytest.raises(lease.LeaseHeld):
            lease.wait_free(first.lease.loc, 0.6)
        assert time.monotonic() - t0 >= 0.6
    finally:
        lease.set_owner(None)
        first.release()
    assert not (tmp_path / "_staging").exists()  # the lease and its empty folder are gone
    lease.claim(dest, storage.new_run_name()).release()


def test_live_owner_keeps_its_staging_dead_owner_is_cleaned_up(tmp_path):
    dest = tmp_path / "out"
    run = storage.new_run_name()
    proc = _owner(dest, run)
    staged = tmp_path / "_staging" / f"out.{run}" / "part.parquet"
    try:
        with pytest.raises(lease.LeaseHeld):
            lease.claim(str(dest), storage.new_run_name())
        # another destination in the same folder, cleaning every destination's staging: the live
        # owner's folder is kept although its run started earlier
        other = lease.claim(str(tmp_path / "other"), storage.new_run_name(), any_dest=True)
        other.release()
        assert staged.read_bytes() == b"live"
    finally:
        _kill(proc)
    later = lease.claim(str(dest), storage.new_run_name())  # pid gone: expired at once, taken over
    try:
        assert not staged.parent.exists()
    finally:
        later.release()


def test_old_folder_restored_only_once_its_replace_is_dead(tmp_path):
    """A replace moved the published output aside and has not renamed its staging yet: while
    its owner lives, a starting run leaves the ``.old`` folder alone (the destination is missing on
    purpose); once the owner is killed, the next run puts the old output back."""
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text("{}")
    run = storage.new_run_name()
    proc = _owner(dest, run)
    aside = tmp_path / "_staging" / f"out.{run}.old"
    os.rename(dest, aside)
    try:
        lease.claim(str(tmp_path / "other"), storage.new_run_name(), any_dest=True).release()
        assert aside.is_dir() and not dest.exists()
    finally:
        _kill(proc)
    lease.claim(str(dest), storage.new_run_name()).release()
    assert (dest / MARKER).is_file() and not aside.exists()


def test_stalled_holder_loses_its_lease_and_publishes_nothing(tmp_path):
    dest = Location.of(tmp_path / "out")
    first = lease.claim(dest, storage.new_run_name())
    first.staging.create_dir()
    first.lease._stop.set()  # the holder stalls: no heartbeat
    first.lease._thread.join()
    time.sleep(2.3)
    second = lease.claim(dest, storage.new_run_name())  # expired: taken over, the stalled staging cleaned
    try:
        assert not first.staging.exists()
        first.staging.create_dir()  # the stalled holder wakes up and writes on
        first.lease._stop.clear()
        first.lease._beat_once()
        with pytest.raises(lease.LeaseLost, match="took over; nothing published"):
            storage.publish(first.staging, dest, MARKER, {})
        assert not dest.exists()
        second.staging.create_dir()
        storage.publish(second.staging, dest, MARKER, {"v": 2})
        assert (tmp_path / "out" / MARKER).is_file()
    finally:
        first.release()
        second.release()


def test_infer_commit_fails_when_rows_were_published_meanwhile(tmp_path):
    """The exactly-once check before publishing: a partition published after this run listed the
    output, holding one of its inputs for the same model, fails the commit; nothing is published."""
    from pipelines import infer
    from pipelines.detections import OUTPUT_SCHEMA, SUCCESS

    out = Location.of(tmp_path / "det")
    model = infer.ModelIdentity(uri="m", sha256="d" * 64, name="frcnn", version="3")
    run = storage.new_run_name()
    inputs = infer.Inputs(kind="files", root=Location.of(tmp_path), items=[
        {"image_id": i, "path": i, "fs_path": i} for i in ("a.jpg", "b.jpg")])
    partition = out.child(f"run={run}")
    plan = infer._Plan(run=run, out=out, inputs=inputs, todo=[{"image_id": "b.jpg"}], listed_runs=(),
                       partition=partition, staging=storage.staging_location(partition, run), meta={}, started=None)
    other = tmp_path / "det" / f"run={storage.new_run_name()}"
    other.mkdir(parents=True)
    row = {c.name: None for c in OUTPUT_SCHEMA}
    row.update(image_id="b.jpg", model_name="frcnn", model_version="3")
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA), other / "part-0.parquet")
    (other / SUCCESS).write_text("{}")
    plan.staging.create_dir()
    with pytest.raises(infer.AlreadyPublished, match="published 1 of this run's 1 inputs for frcnn/3"):
        infer._commit(plan, model, summary=None)
    assert infer.published_runs(out) == [other.name]
