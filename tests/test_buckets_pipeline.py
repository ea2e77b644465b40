"""Aspect-ratio canvas buckets through Ray: shards and their manifest, training on two workers,
the streamed batches (the per-image parts are in test_buckets.py)."""

from __future__ import annotations

import numpy as np
import pytest

from frcnn.config import CanvasConfig
from pipelines import precompute as pc
from pipelines import schema
from tests.test_buckets import BUCKETS, SIZES, bucket_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg():
    return bucket_config()


@pytest.fixture(scope="module")
def data_root(synth_dataset) -> str:
    return str(synth_dataset(n_images=40, seed=11, sizes=SIZES).root)


@pytest.fixture(scope="module")
def shards(ray_session, cfg, data_root, tmp_path_factory):
    out = {}
    for split in ("trainval", "val"):
        out[split] = str(tmp_path_factory.mktemp("bucket_shards") / split)
        pc.precompute(data_root, split, out[split], cfg, rows_per_shard=8, progress=False)
    return out


def test_shards_record_the_bucket_and_other_buckets_are_refused(shards, cfg):
    ds, manifest = pc.open_precomputed(shards["trainval"], cfg)
    assert manifest["targets"]["canvas_buckets"] == [list(b) for b in BUCKETS]
    got = ds.take_all()
    assert {(r["canvas_height"], r["canvas_width"]) for r in got} == set(BUCKETS)
    for r in got:
        assert schema.decode_canvas(r["image"]).shape[:2] == (r["canvas_height"], r["canvas_width"])
    other = bucket_config(BUCKETS + ((96, 128),))
    with pytest.raises(schema.ManifestMismatch, match=r"canvas_buckets=\[\[96, 160\].*canvas_buckets=\[\[96, 160\]"):
        pc.open_precomputed(shards["trainval"], other)
    # Shards with buckets, a config without (one 160x160 canvas, the same rule): refused.
    one = cfg.replace(canvas=CanvasConfig(height=160, width=160, short_side=96, max_long_side=160))
    with pytest.raises(schema.ManifestMismatch, match=r"canvas_buckets=\[\[96, 160\].*canvas_buckets=None"):
        pc.open_precomputed(shards["trainval"], one)
    # And the other way: shards without buckets, a config with them.
    plain = {**manifest, "targets": {k: v for k, v in manifest["targets"].items() if k != "canvas_buckets"}}
    with pytest.raises(schema.ManifestMismatch, match="canvas_buckets=None"):
        schema.check_manifest(plain, cfg.target_fields(), "shards")


def test_training_with_buckets_on_two_workers(shards, cfg, tmp_path, tracking_uri, monkeypatch):
    """A real run_training: 2 workers, batches of 2, rows on three buckets. A mixed batch would
    fail the step (``to_model_inputs`` refuses it); ranks with unequal step counts would hang."""
    from mlflow.tracking import MlflowClient

    from frcnn.training import TrainConfig
    from jobs.train import run_training

    monkeypatch.chdir(tmp_path)
    tc = TrainConfig(epochs=2, batch_size=2, log_every=2, warmup_steps=1, base_lr=0.01)
    res = run_training(shards["trainval"], shards["val"], model_cfg=cfg, train_cfg=tc, workers=2, cpus_per_worker=1,
                       experiment="buckets", storage_path=str(tmp_path / "ray"), model_name=None)
    rows = pc.open_precomputed(shards["trainval"], cfg)[1]["rows"]
    steps = rows // 4 * 2
    client = MlflowClient(tracking_uri)
    hist = client.get_metric_history(res.run_id, "train/loss_total")
    assert max(m.step for m in hist) == steps and all(np.isfinite(m.value) for m in hist)
    assert "val_map50" in res.metrics


def test_streamed_shard_batches_hold_one_bucket(shards, cfg):
    """The streaming path (data too large for memory): the real Ray Data decode of rows on three
    buckets, regrouped per bucket on the worker, exactly ``steps`` batches."""
    from frcnn.training import TrainConfig
    from jobs.train_data import WorkerData, _decode_fn, _positions

    ds, manifest = pc.open_precomputed(shards["trainval"], cfg)
    data = WorkerData.__new__(WorkerData)  # as a worker builds it, with this shard in place of get_dataset_shard's
    data.rank, data.world, data.tcfg, data.bucketed = 0, 1, TrainConfig(batch_size=3), True
    data.train = ds.map_batches(_decode_fn(_positions(cfg)), batch_size=5)
    steps = manifest["rows"] // 3
    batches = list(data.epoch(0, steps))
    assert len(batches) == steps
    for batch in batches:
        images, targets = schema.to_model_inputs(batch)
        hw = tuple(images.shape[-2:])
        assert images.shape[0] == 3 and hw in BUCKETS
        assert targets["anchor_labels"].shape == (3, cfg.anchor_positions()[hw])
    assert len({tuple(b["canvas_height"].tolist() + b["canvas_width"].tolist()) for b in batches}) > 1
