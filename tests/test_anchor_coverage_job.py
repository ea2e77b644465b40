"""Anchor coverage through the real ``run_precompute`` (Ray Data, MLflow): the metrics the run logs
equal a plain loop over the published rows' boxes and every anchor, the plot is an artifact of
the run, and the warning is one line, logged once, naming a scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from frcnn.anchors import grid_anchors
from frcnn.config import AnchorConfig
from pipelines.synth import SYNTH_CLASSES, generate
from tests.oracles.anchor_coverage_loop import best_iou_loop

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


def test_precompute_logs_coverage_equal_to_a_plain_loop(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from frcnn.config import tiny_config
    from jobs.data_cmds import run_precompute

    data = tmp_path / "synth"
    generate(data, n_images=16, seed=11, min_size=64, max_size=128)
    # Anchors of 64 and 128 px only on a 128 px canvas: the smaller objects have no good anchor.
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=128).replace(anchors=AnchorConfig(16, (4.0, 8.0), (0.5, 1.0, 2.0)))
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"model": cfg.to_dict()}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "pre"
    with caplog.at_level(logging.WARNING, logger="pipelines.precompute"):
        res = run_precompute(str(data), "trainval", str(out), config_path=str(config), experiment="coverage",
                             tracking_uri=uri, rows_per_shard=8, progress=False)

    # The oracle: every published row's target boxes against every anchor, one at a time.
    anchors = grid_anchors(8, 8, 16, (4.0, 8.0), (0.5, 1.0, 2.0)).double().numpy()
    per_size = {0: [], 1: [], 2: []}
    for f in sorted(out.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 4)[~np.asarray(row["difficult"], bool)]
            best = best_iou_loop(anchors, boxes, row["canvas_height"], row["canvas_width"])
            for b, iou in zip(boxes.tolist(), best, strict=True):
                area = (b[2] - b[0]) * (b[3] - b[1]) / row["scale"] ** 2  # in the original image's pixels
                per_size[int(area >= 32**2) + int(area >= 96**2)].append(iou)
    every = [x for v in per_size.values() for x in v]
    assert len(every) > 20

    m = MlflowClient(uri).get_run(res.run_id).data.metrics
    assert m["anchor_boxes"] == len(every)
    assert m["anchor_coverage"] == pytest.approx(np.mean(np.array(every) >= 0.3), abs=1e-9)
    assert m["anchor_share_at_pos_iou"] == pytest.approx(np.mean(np.array(every) >= 0.7), abs=1e-9)
    for k, name in enumerate(("small", "medium", "large")):
        assert m[f"anchor_boxes_{name}"] == len(per_size[k])
        if per_size[k]:
            assert m[f"anchor_coverage_{name}"] == pytest.approx(np.mean(np.array(per_size[k]) >= 0.3), abs=1e-9)
            assert m[f"anchor_best_iou_mean_{name}"] == pytest.approx(np.mean(per_size[k]), abs=1e-9)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(res.run_id)}
    assert "anchor_coverage.png" in artifacts

    assert m["anchor_coverage"] < 0.9
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("anchor coverage")]
    manifest = json.loads((out / "_frcnn_manifest.json").read_text())
    assert lines == [manifest["anchor_coverage"]["warning"]] and "\n" not in lines[0]
    assert ": add anchor scale " in lines[0]
    assert Path(out).exists()
