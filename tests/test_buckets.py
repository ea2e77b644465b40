"""Aspect-ratio canvas buckets: the precompute's per-image code (targets per bucket against the
walkthrough's loop port), flips, batching (one bucket per batch, equal step counts), detection.
The Ray parts (shards and their manifest, training, streaming) are in test_buckets_pipeline.py.

A scaled-down VOC recipe: the paper's rule at short side 96, long side <= 160, buckets 96x160
(landscape), 160x96 (portrait), 96x96 (square); images 200x150, 150x200, 200x133 and 160x160.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN
from frcnn.anchors import assign_anchor_targets, grid_anchors, hflip_anchor_targets
from frcnn.boxes import BoxCoder, hflip_boxes
from frcnn.canvas import CanvasTransform
from frcnn.config import CanvasConfig, ModelConfig, tiny_config
from frcnn.training import hflip_batch
from jobs.train_data import bucket_batches, row_buckets
from pipelines import schema
from pipelines.precompute_rows import process_item
from pipelines.synth import SYNTH_CLASSES
from pipelines.voc import list_split
from tests.oracles import walkthrough_port as wp

BUCKETS = ((96, 160), (160, 96), (96, 96))
SIZES = ((200, 150), (150, 200), (200, 133), (160, 160))  # (width, height), as synth takes them


def bucket_config(buckets=BUCKETS) -> ModelConfig:
    base = tiny_config(5, SYNTH_CLASSES, canvas=96)
    return base.replace(canvas=CanvasConfig(height=96, width=96, short_side=96, max_long_side=160, buckets=buckets))


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return bucket_config()


@pytest.fixture(scope="module")
def data_root(synth_dataset) -> str:
    return str(synth_dataset(n_images=40, seed=11, sizes=SIZES).root)


@pytest.fixture(scope="module")
def rows(cfg, data_root):
    """Rows of the trainval split, made by the precompute's per-image code (no Ray)."""
    spec = {"cfg": cfg.to_dict(), "class_names": list(SYNTH_CLASSES), "dataset_classes": list(SYNTH_CLASSES),
            "use_difficult": False, "drop_empty": False, "jpeg_quality": 95, "data_root": data_root,
            "root_shown": data_root}
    out = []
    for item in list_split(data_root, "trainval"):
        row = process_item(dataclasses.asdict(item), spec).row
        assert row is not None
        out.append(row)
    return out


def test_each_image_on_its_bucket_with_targets_equal_to_the_port(cfg, rows):
    """Every row is on the bucket ``CanvasTransform`` picks, and its anchor targets equal the
    walkthrough's loop port run on THAT bucket's grid (whose anchors are the walkthrough's)."""
    transform = CanvasTransform.from_config(cfg.canvas)
    a = cfg.anchors
    seen = set()
    for row in rows:
        hw = (row["canvas_height"], row["canvas_width"])
        assert hw == transform.canvas_for(row["orig_height"], row["orig_width"])
        assert schema.decode_canvas(row["image"]).shape == (*hw, 3)
        seen.add(hw)
        fh, fw = cfg.feature_size_for(hw)
        anchors = grid_anchors(fh, fw, a.stride, a.scales, a.ratios)
        walk = torch.tensor(wp.walkthrough_anchors_xyxy_ymajor(fh, fw, a.stride, a.ratios, a.scales))
        torch.testing.assert_close(anchors.double(), walk.double(), atol=2e-3, rtol=0)
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)[~np.asarray(row["difficult"], bool)]
        port = wp.walkthrough_anchor_targets(anchors.double().tolist(), boxes.tolist(), hw, cfg.rpn.pos_iou,
                                             cfg.rpn.neg_iou)
        assert row["anchor_labels"].tolist() == port.labels
        pos = [k for k, v in enumerate(port.labels) if v == 1]
        assert row["pos_anchor_index"].tolist() == pos
        np.testing.assert_allclose(row["pos_anchor_deltas"].reshape(-1, 4), np.asarray(port.deltas)[pos],
                                   rtol=1e-5, atol=1e-5)
    assert seen == set(BUCKETS)  # all three buckets, both orientations, were exercised


def test_flip_per_bucket_equals_targets_of_flipped_boxes(cfg, rows):
    """hflip_batch on a batch of each bucket: the image mirrored at the bucket's width, and the
    stored targets mirrored on the bucket's grid equal targets computed from the flipped boxes."""
    coder = BoxCoder(cfg.rpn.box_weights)
    a = cfg.anchors
    for hw in BUCKETS:
        mine = [r for r in rows if (r["canvas_height"], r["canvas_width"]) == hw][:3]
        assert mine
        batch = schema.decode_batch({k: [r[k] for r in mine] for k in mine[0]}, cfg.anchor_positions())
        images, targets = schema.to_model_inputs(batch)
        flip = torch.ones(len(mine), dtype=torch.bool)
        f_images, f_targets = hflip_batch(images, targets, flip, cfg)
        assert torch.equal(f_images, images.flip(-1))
        grid = grid_anchors(*cfg.feature_size_for(hw), a.stride, a.scales, a.ratios)
        for i, b in enumerate(targets["boxes"]):
            fb = hflip_boxes(b, hw[1])
            assert torch.equal(f_targets["boxes"][i], fb)
            t = assign_anchor_targets(grid, fb, hw, cfg.rpn.pos_iou, cfg.rpn.neg_iou, coder)
            assert torch.equal(f_targets["anchor_labels"][i], t.labels)
            torch.testing.assert_close(f_targets["anchor_deltas"][i], t.deltas, atol=1e-5, rtol=1e-5)
        # flipping twice is the identity, bit for bit
        labels2, deltas2 = hflip_anchor_targets(f_targets["anchor_labels"], f_targets["anchor_deltas"],
                                                cfg.feature_size_for(hw), a.num_anchors)
        assert torch.equal(labels2, targets["anchor_labels"]) and torch.equal(deltas2, targets["anchor_deltas"])


def test_a_batch_mixing_buckets_is_refused(cfg, rows):
    by_hw = {(r["canvas_height"], r["canvas_width"]): r for r in rows}
    mixed = [by_hw[(96, 160)], by_hw[(160, 96)]]
    batch = schema.decode_batch({k: [r[k] for r in mixed] for k in mixed[0]}, cfg.anchor_positions())
    assert batch["image"].dtype == object and batch["canvas_width"].tolist() == [160, 96]
    with pytest.raises(ValueError, match="one bucket"):
        schema.to_model_inputs(batch)
    with pytest.raises(schema.ManifestMismatch, match="96x160 canvas"):
        schema.decode_batch({k: [mixed[0][k]] for k in mixed[0]}, tiny_config(5, canvas=96).anchor_positions())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bucket_batches_never_mix_and_every_rank_takes_the_same_steps(world):
    rng = np.random.default_rng(world)
    n, bs = 103, 4
    bucket = rng.choice([0, 1, 2], size=n, p=[0.6, 0.3, 0.1])
    steps = max(n // (bs * world), 1)  # jobs.train_data.steps_per_epoch
    order = rng.permutation(n)
    for rank in range(world):
        mine = order[rank::world]
        batches, left = bucket_batches(mine, bucket, bs, steps)
        assert len(batches) == steps and left.size == 0
        for b in batches:
            assert len(b) == bs and len(set(bucket[b].tolist())) == 1  # one bucket per batch
            assert set(b.tolist()) <= set(mine.tolist())  # only this rank's rows
        # Until the top-ups, no row is used twice.
        full, rest = bucket_batches(mine, bucket, bs, None)
        used = np.concatenate(full) if full else np.zeros(0, int)
        assert len(set(used.tolist())) == len(used) and sorted(used.tolist() + rest.tolist()) == sorted(mine.tolist())
        assert all(np.array_equal(x, y) for x, y in zip(full, batches[:len(full)]))
    # A bucket smaller than a batch is cycled within itself.
    batches, _ = bucket_batches(np.arange(3), np.array([7, 7, 7]), 4, 2)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 0], [0, 1, 2, 0]]


def test_row_buckets_key_is_the_canvas():
    cols = {"canvas_height": np.array([96, 160, 96], np.int32), "canvas_width": np.array([160, 96, 96], np.int32)}
    keys = row_buckets(cols)
    assert len(set(keys.tolist())) == 3 and keys[0] != keys[1]


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_detection_on_a_bucketed_model_in_original_pixels(cfg):
    """Landscape, portrait and square images in one predict call: each goes through the model on
    its own bucket and comes back in its original pixels, equal to detecting it alone."""
    from frcnn.inference import Detector

    torch.manual_seed(0)
    model = FasterRCNN(cfg).eval()
    det = Detector(model, threads=1)
    sizes = [(200, 150), (150, 200), (160, 160), (200, 133)]
    data = [_jpeg(w, h, i) for i, (w, h) in enumerate(sizes)]
    results = det.predict(data)
    for (w, h), d, raw in zip(sizes, results, data):
        assert d.error is None and (d.width, d.height) == (w, h)
        assert len(d.boxes) > 0  # an untrained head scores about 1/6 per class, above 0.05
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        canvas, scale = model.canvas.apply_image(image)
        assert canvas.shape[:2] == model.canvas.canvas_for(h, w)
        with torch.no_grad():
            (alone,) = model(torch.from_numpy(canvas).permute(2, 0, 1)[None])
        np.testing.assert_allclose(d.boxes, model.canvas.invert_boxes(alone["boxes"], scale, h, w).numpy(),
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(d.scores, alone["scores"].numpy(), rtol=1e-5, atol=1e-6)
    assert {model.canvas.canvas_for(h, w) for w, h in sizes} == set(BUCKETS)
