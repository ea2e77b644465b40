"""COCO and YOLO data end to end: ``precompute -> train -> evaluate -> promote -> infer``.

Cheap and exact rather than long: the same generated data is written in the three layouts and
precomputed; the shards are shown equal in every target column (COCO: every column but the image
id), so training on any of them is training on the same rows. One tiny model is trained on the
COCO shards, then evaluated on the COCO, VOC and YOLO layouts: the COCO evaluation's VOC mAP@0.5
is the VOC layout's (the same model on the same images and boxes), and rescoring its logged
``coco_results.json`` by hand with pycocotools gives exactly its ``coco_map``. The COCO-evaluated
version is promoted and ``infer`` runs it over the COCO test images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from frcnn import tiny_config
from pipelines.datasets import DatasetSource
from pipelines.synth import SYNTH_CLASSES, generate

pytestmark = pytest.mark.integration

CANVAS = 128
TARGETS = ("anchor_labels", "pos_anchor_index", "pos_anchor_deltas")


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_session):
    from jobs.data_cmds import run_precompute
    from pipelines.precompute import PrecomputeOptions, precompute

    root = tmp_path_factory.mktemp("chain")
    for fmt in ("voc", "coco", "yolo"):
        generate(root / fmt, n_images=24, seed=5, min_size=96, max_size=160, format=fmt)
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=CANVAS)
    roots = {"voc": str(root / "voc"), "coco": str(root / "coco"), "yolo": str(root / "yolo" / "data.yaml")}
    shards = {f: str(root / f"pre_{f}") for f in roots}
    for fmt in ("voc", "yolo"):
        precompute(DatasetSource(fmt, root=roots[fmt]), "trainval", shards[fmt], cfg, rows_per_shard=64,
                   progress=False)
    # COCO through the tracked job: its run logs the dataset input.
    config = root / "tiny128.yaml"
    config.write_text(yaml.safe_dump({"model": json.loads(json.dumps(cfg.to_dict()))}))
    uri = f"sqlite:///{root}/precompute.db"
    pre = run_precompute(DatasetSource("coco", root=roots["coco"]), "trainval", shards["coco"],
                         config_path=str(config), options=PrecomputeOptions(rows_per_shard=64, progress=False),
                         experiment="chain-precompute", tracking_uri=uri)
    return {"root": root, "roots": roots, "shards": shards, "cfg": cfg, "precompute": (uri, pre.run_id)}


def _rows(path: str) -> dict[str, dict]:
    table = pq.read_table(path)  # the folder: every shard
    return {r["image_id"]: r for r in table.to_pylist()}


def test_three_layouts_give_the_same_shards(data):
    voc, coco, yolo = (_rows(data["shards"][f]) for f in ("voc", "coco", "yolo"))
    assert len(voc) == len(coco) == len(yolo) > 0
    manifest = json.loads((Path(data["shards"]["coco"]) / "_frcnn_manifest.json").read_text())
    assert manifest["dataset"] == "coco" and manifest["category_ids"] == [1, 3, 5, 7, 9]
    assert manifest["model_config"]["category_ids"] == [1, 3, 5, 7, 9]
    from mlflow.tracking import MlflowClient

    uri, run_id = data["precompute"]
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in inputs] == [
        ("coco-trainval", manifest["content_hash"], "precompute")]
    assert manifest["skipped"] == [] and all("all-negative" in w["reason"] for w in manifest["warnings"])
    for image_id, v in voc.items():
        c, y = coco[str(int(image_id) + 1)], yolo[image_id]
        assert {k: c[k] for k in c if k != "image_id"} == {k: v[k] for k in v if k != "image_id"}
        for column in TARGETS + ("image", "scale", "canvas_height", "canvas_width"):
            assert y[column] == v[column], (image_id, column)
        keep = ~np.asarray(v["difficult"], bool)
        assert np.array_equal(np.asarray(y["boxes"]).reshape(-1, 4), np.asarray(v["boxes"]).reshape(-1, 4)[keep])


@pytest.fixture()
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    return uri


def test_coco_chain_train_evaluate_promote_infer(data, store, tmp_path):
    from mlflow.tracking import MlflowClient
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from frcnn.training import TrainConfig
    from jobs.evaluate import run_evaluation
    from jobs.infer import run_infer
    from jobs.models import promote
    from jobs.train import run_training

    tc = TrainConfig(epochs=3, batch_size=2, base_lr=0.02, lr_reference_batch=2, warmup_steps=2, log_every=5,
                     checkpoint_every=1000, val_every=1000, keep_checkpoints=1, max_failures=0)
    trained = run_training(data["shards"]["coco"], train_cfg=tc, workers=1, experiment="chain",
                           storage_path=str(tmp_path / "ray"), model_name="frcnn-chain", progress_every=60)
    client = MlflowClient(store)
    inputs = client.get_run(trained.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("coco-trainval", "train")]
    model = f"models:/frcnn-chain/{trained.model_version}"
    from frcnn.inference import load_model
    from jobs.models import CHECKPOINT_FILE

    ckpt = Path(trained.checkpoint_path) / CHECKPOINT_FILE
    assert load_model(ckpt.read_bytes()).cfg.category_ids == (1, 3, 5, 7, 9)

    coco_root = str(data["root"] / "coco")
    res = run_evaluation(model, source=DatasetSource("coco", root=coco_root), split="test", experiment="chain",
                         verbose=False, batch_size=4)
    voc = run_evaluation(model, data_root=data["roots"]["voc"], split="test", experiment="chain", verbose=False,
                         batch_size=4)
    yolo = run_evaluation(model, source=DatasetSource("yolo", root=data["roots"]["yolo"]), split="test",
                          experiment="chain", verbose=False, batch_size=4)
    # The same model on the same images and boxes: the same VOC mAP@0.5 in every layout (COCO's
    # crowd = VOC's difficult; YOLO leaves difficult objects out, so it may differ a little).
    assert abs(res.metrics["map50"] - voc.metrics["map50"]) <= 0.02 and res.metrics["map50"] > 0
    assert math.isfinite(yolo.metrics["map50"])

    # pycocotools by hand on the logged results and the original annotation file: the run's AP.
    results = client.download_artifacts(res.run_id, "coco_results.json", str(tmp_path))
    gt = COCO(str(Path(coco_root) / "annotations" / "instances_test.json"))
    by_hand = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    by_hand.evaluate()
    by_hand.accumulate()
    by_hand.summarize()
    assert float(by_hand.stats[0]) == res.metrics["coco_map"]
    assert {r["category_id"] for r in json.loads(Path(results).read_text())} <= {1, 3, 5, 7, 9}
    names = [i.dataset.name for i in client.get_run(res.run_id).inputs.dataset_inputs]
    assert names == ["coco-test"]

    promoted = promote(model, "champion", if_better_than="champion", split="test", dataset="coco",
                       data_root=coco_root, verbose=False)
    assert promoted.promoted and promoted.candidate_run_id == res.run_id
    out = run_infer("models:/frcnn-chain@champion", str(Path(coco_root) / "test"), str(tmp_path / "dets"),
                    experiment="chain", progress=False)
    assert out.summary.new == len(json.loads(
        (Path(coco_root) / "annotations" / "instances_test.json").read_text())["images"])
    from pipelines.infer import read_published

    dets = read_published(str(tmp_path / "dets"))
    labels, ids = dets.column("labels").to_pylist(), dets.column("category_ids").to_pylist()
    assert sum(map(len, labels)) > 0  # the model's detections go out with COCO's own category ids
    assert [[(1, 3, 5, 7, 9)[k - 1] for k in row] for row in labels] == ids
