"""``frcnn-jobs evaluate`` on COCO data and on a split with an unreadable annotation (real MLflow in
a tmp sqlite store; detections files, so no Ray): COCO AP from COCOeval on the original file,
rescored by hand; an entity-bomb annotation gives one clean line, or with ``--on-error skip`` its
image is left out, counted and logged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.evaluate import run_evaluation
from pipelines.datasets import DatasetSource
from pipelines.groundtruth import load_ground_truth
from pipelines.synth import generate

pytestmark = pytest.mark.integration

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<annotation><size><width>64</width><height>64</height></size><object><name>&lol2;</name></object></annotation>
"""


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaldata")
    for fmt in ("voc", "coco"):
        generate(root / fmt, n_images=20, seed=4, min_size=96, max_size=160, format=fmt)
    return {"voc": str(root / "voc"), "coco": str(root / "coco")}


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _dets(path: Path, gt, jitter: float) -> str:
    """Detections: each ground-truth box shifted by ``jitter`` px, score falling with the index."""
    ids = list(gt.boxes)
    rows = [(i, np.asarray(gt.boxes[i]["boxes"]) + jitter * (k % 3), gt.boxes[i]["labels"]) for k, i in enumerate(ids)]
    pq.write_table(pa.table({
        "image_id": pa.array([r[0] for r in rows], pa.string()),
        "boxes": pa.array([np.asarray(r[1], np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "scores": pa.array([np.linspace(0.9, 0.5, len(r[2]), dtype=np.float32) for r in rows],
                           pa.list_(pa.float32())),
        "labels": pa.array([np.asarray(r[2], np.int32) for r in rows], pa.list_(pa.int32())),
    }), path)
    return str(path)


def test_coco_ap_is_cocoeval_on_the_original_file_and_rescores_exactly(roots, store, tmp_path):
    from mlflow.tracking import MlflowClient
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    source = DatasetSource("coco", root=roots["coco"])
    gt = load_ground_truth(source, "test")
    assert gt.category_ids == (1, 3, 5, 7, 9) and all(isinstance(v, int) for v in gt.original_ids.values())
    res = run_evaluation(detections=_dets(tmp_path / "d.parquet", gt, 3.0), source=source, split="test",
                         experiment="coco-eval", verbose=False)
    client = MlflowClient(store)
    results = client.download_artifacts(res.run_id, "coco_results.json", str(tmp_path))
    ann_file = str(Path(roots["coco"]) / "annotations" / "instances_test.json")
    by_hand = COCOeval(COCO(ann_file), COCO(ann_file).loadRes(results), iouType="bbox")
    by_hand.evaluate()
    by_hand.accumulate()
    by_hand.summarize()
    assert float(by_hand.stats[0]) == res.metrics["coco_map"] and 0 < res.metrics["coco_map"] < 1
    assert float(by_hand.stats[1]) == res.metrics["coco_ap50"]
    first = json.loads(Path(results).read_text())[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score"} and first["category_id"] in (1, 3, 5, 7, 9)
    assert 0 < res.metrics["map50"] <= 1  # VOC mAP@0.5 beside it
    inputs = client.get_run(res.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("coco-test", gt.digest)]


def _bomb(roots, tmp_path) -> tuple[str, str]:
    """A copy of the VOC layout whose first test image's annotation is an entity bomb."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(roots["voc"], root)
    year = root / "VOCdevkit" / "VOC2007"
    first = (year / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (year / "Annotations" / f"{first}.xml").write_bytes(BILLION_LAUGHS)
    return str(root), first


def test_unreadable_annotation_is_one_clean_line(roots, store, tmp_path):
    from click.testing import CliRunner

    from jobs.cli import main

    root, first = _bomb(roots, tmp_path)
    dets = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image_id": ["x"], "boxes": pa.array([[]], pa.list_(pa.float32())),
                             "scores": pa.array([[]], pa.list_(pa.float32())),
                             "labels": pa.array([[]], pa.list_(pa.int32()))}), dets)
    res = CliRunner().invoke(main, ["evaluate", "--detections", str(dets), "--data-root", root, "--split", "test"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "mlflow.store.db" not in ln]  # a new store
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("Error: ground truth incomplete: ") and f"{first}.xml" in lines[0]


def test_on_error_skip_leaves_the_image_out_counts_and_logs_it(roots, store, tmp_path):
    from mlflow.tracking import MlflowClient

    root, first = _bomb(roots, tmp_path)
    gt = load_ground_truth(root, "test", on_error="skip")
    assert first not in gt.image_ids and [s["image_id"] for s in gt.skipped] == [first]
    res = run_evaluation(detections=_dets(tmp_path / "d.parquet", gt, 0.0), data_root=root, split="test",
                         on_error="skip", experiment="skip-eval", verbose=False)
    assert res.metrics["images_skipped"] == 1 and res.metrics["images"] == len(gt.image_ids)
    assert res.metrics["map50"] == 1.0  # the other images, scored as usual
    client = MlflowClient(store)
    skipped = json.loads(Path(client.download_artifacts(res.run_id, "skipped.json", str(tmp_path))).read_text())
    assert [s["image_id"] for s in skipped] == [first] and skipped[0]["source"].endswith(f"{first}.xml")
