"""`make cluster-rehearsal` inside the test suite, so CI runs it: PostgreSQL + MLflow server +
moto S3 + a three-node Ray cluster on 127.0.0.1, the infra/README jobs through `ray job submit`,
four faults. The harness (infra/rehearsal/rehearse.py) asserts each step against what the engines
hold and exits non-zero on the first failed assertion; here its summary is checked as well, so a
harness that silently skipped a fault cannot pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("initdb", "pg_ctl", "pg_dump", "createdb") + (("runuser",) if os.geteuid() == 0 else ())
MISSING = [tool for tool in NEEDS if shutil.which(tool) is None]

pytestmark = pytest.mark.cluster


@pytest.mark.skipif(bool(MISSING), reason=f"PostgreSQL server tools not on the PATH: {MISSING}")
def test_cluster_rehearsal(tmp_path):
    summary_file = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, str(REPO / "infra" / "rehearsal" / "rehearse.py"),
                          "--summary", str(summary_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-8000:] + "\n" + res.stderr[-4000:]
    summary = json.loads(summary_file.read_text())
    assert summary["ok"] is True
    obs = summary["observed"]

    # (c) the S3 endpoint went away after a shard was staged: the job failed, nothing published.
    assert obs["fault_c"]["status"] == "FAILED" and obs["fault_c"]["staged_shards_at_cut"] >= 1
    # (a) a worker node was killed after a checkpoint, the group restarted from a checkpoint (its
    # rank 0 recorded the step) and the run went on to its last step.
    assert obs["fault_a"]["checkpoints_before"] >= 1 and obs["fault_a"]["resumed_from_steps"]
    assert obs["fault_b"]["last_step"] == obs["fault_b"]["total_steps"]
    # (d) the infer job was stopped mid-write, then two runs published every input exactly once.
    assert obs["fault_d"]["status"] == "STOPPED"
    assert len(obs["infer"]["partitions"]) >= 1
    # Secrets: the whole database and every object were scanned.
    assert summary["secrets"]["objects_scanned"] > 20
    for name in ("postgres", "mlflow", "s3", "ray-dashboard"):
        assert summary["listening"][name] == "127.0.0.1"
