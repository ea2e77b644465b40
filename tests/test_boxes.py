"""Box coding, box utilities, the canvas transform and the configuration."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from frcnn.boxes import BBOX_XFORM_CLIP, BoxCoder, clip_boxes, hflip_boxes
from frcnn.canvas import CanvasTransform, to_tensor
from frcnn.config import AnchorConfig, ModelConfig, RoIHeadConfig, RPNConfig, tiny_config


def _random_boxes(n: int, seed: int, size: float = 800.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = 20.0 + torch.rand(n, 2, generator=g) * size * 0.5  # ratios within exp(BBOX_XFORM_CLIP)
    return torch.cat((xy, xy + wh), dim=1)


# ---- BoxCoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_round_trip(weights):
    coder = BoxCoder(weights)
    boxes, ref = _random_boxes(500, 0), _random_boxes(500, 1)
    deltas = coder.encode(boxes, ref)
    assert deltas.shape == (500, 4) and torch.isfinite(deltas).all()
    torch.testing.assert_close(coder.decode(deltas, ref), boxes, atol=1e-4, rtol=1e-5)
    # Decoding K classes at once: (N, 4K) deltas give (N, 4K) boxes, class by class.
    other = _random_boxes(500, 2)
    d2 = torch.cat((deltas, coder.encode(other, ref)), dim=1)
    out = coder.decode(d2, ref)
    assert out.shape == (500, 8)
    torch.testing.assert_close(out[:, :4], boxes, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[:, 4:], other, atol=1e-4, rtol=1e-5)
    # And encode(decode(d)) = d for deltas within the clamp.
    d = torch.randn(300, 4, generator=torch.Generator().manual_seed(3)) * torch.tensor(weights) * 0.5
    torch.testing.assert_close(coder.encode(coder.decode(d, ref[:300]), ref[:300]), d, atol=1e-4, rtol=1e-4)


def test_encode_hand_computed():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    box = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20), w 20, h 20
    torch.testing.assert_close(BoxCoder().encode(box, ref), torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))
    torch.testing.assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(box, ref),
                               torch.tensor([[10.0, 5.0, 5 * math.log(2.0), 0.0]]))
    # A zero delta decodes to the reference itself.
    torch.testing.assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(1, 4), ref), ref)


def test_decode_clamps_dw_dh_before_exp():
    ref = torch.tensor([[100.0, 100.0, 116.0, 132.0]])  # w 16, h 32
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        out = BoxCoder(weights).decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), ref)
        assert torch.isfinite(out).all()
        w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
        torch.testing.assert_close(w, torch.tensor(16.0 * math.exp(BBOX_XFORM_CLIP)))
        torch.testing.assert_close(h, torch.tensor(32.0 * math.exp(BBOX_XFORM_CLIP)))
        # The centre does not move.
        torch.testing.assert_close((out[0, 0] + out[0, 2]) / 2, torch.tensor(108.0))
    # Negative deltas are not clamped: boxes shrink freely.
    small = BoxCoder().decode(torch.tensor([[0.0, 0.0, -3.0, -3.0]]), ref)
    torch.testing.assert_close(small[0, 2] - small[0, 0], torch.tensor(16.0 * math.exp(-3.0)))


def test_decode_runs_in_float32_under_half_inputs():
    ref = _random_boxes(10, 4)
    d = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    out = BoxCoder().decode(d.bfloat16(), ref)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, BoxCoder().decode(d.bfloat16().float(), ref))


# ---- box utilities ----------------------------------------------------------------------------
def test_clip_boxes():
    boxes = torch.tensor([[-10.0, -5.0, 50.0, 60.0], [20.0, 30.0, 700.0, 900.0], [1.0, 2.0, 3.0, 4.0]])
    out = clip_boxes(boxes, 600, 640)  # height 600, width 640
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 50.0, 60.0], [20.0, 30.0, 640.0, 600.0],
                                                  [1.0, 2.0, 3.0, 4.0]]))
    # (N, K, 4) works the same per box.
    stacked = clip_boxes(boxes[None].repeat(3, 1, 1), 600, 640)
    assert stacked.shape == (3, 3, 4)
    torch.testing.assert_close(stacked[2], out)


def test_hflip_boxes():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]])
    torch.testing.assert_close(hflip_boxes(boxes, 100), torch.tensor([[70.0, 20.0, 90.0, 40.0],
                                                                       [0.0, 0.0, 100.0, 5.0]]))
    b = _random_boxes(50, 6)
    torch.testing.assert_close(hflip_boxes(hflip_boxes(b, 800), 800), b)
    fl = hflip_boxes(b, 800)
    assert bool((fl[:, 2] > fl[:, 0]).all())
    torch.testing.assert_close(fl[:, 2] - fl[:, 0], b[:, 2] - b[:, 0])


# ---- canvas -----------------------------------------------------------------------------------
def test_canvas_scale_and_boxes_forth_and_back():
    t = CanvasTransform(800, 800)
    assert t.scale_for(375, 500) == pytest.approx(1.6)
    assert t.resized_size(375, 500) == (600, 800)
    s = t.scale_for(375, 500)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 500.0, 375.0]])
    canvas_boxes = t.apply_boxes(boxes, s)
    assert torch.equal(canvas_boxes, torch.tensor([[16.0, 32.0, 176.0, 352.0], [0.0, 0.0, 800.0, 600.0]]))
    assert torch.equal(t.invert_boxes(canvas_boxes, s, 375, 500), boxes)
    # invert clips to the original image (a box reaching into the padding).
    clipped = t.invert_boxes(torch.tensor([[700.0, 500.0, 800.0, 700.0]]), s, 375, 500)
    torch.testing.assert_close(clipped, torch.tensor([[437.5, 312.5, 500.0, 375.0]]))
    # Portrait image: the height sets the scale.
    assert t.scale_for(1000, 400) == pytest.approx(0.8)
    assert t.resized_size(1000, 400) == (800, 320)


def test_apply_image_shape_and_padding():
    t = CanvasTransform(800, 800)
    image = Image.new("RGB", (500, 375), (200, 100, 50))  # PIL size is (width, height)
    canvas, s = t.apply_image(image)
    assert s == pytest.approx(1.6)
    assert canvas.shape == (800, 800, 3) and canvas.dtype == np.uint8
    assert (canvas[:600, :800] == np.array([200, 100, 50], dtype=np.uint8)).all()
    assert (canvas[600:] == 0).all()
    # Grey-scale input becomes three channels; padding on the right for a portrait image.
    canvas2, s2 = t.apply_image(Image.new("L", (400, 1000), 77))
    assert canvas2.shape == (800, 800, 3) and s2 == pytest.approx(0.8)
    assert (canvas2[:, :320] == 77).all() and (canvas2[:, 320:] == 0).all()
    tens = to_tensor(canvas)
    assert tens.shape == (3, 800, 800) and tens.dtype == torch.uint8
    assert int(tens[0, 0, 0]) == 200 and int(tens[2, 0, 0]) == 50


# ---- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [ModelConfig(), tiny_config(), tiny_config(3, ("a", "b", "c"), canvas=160)])
def test_config_round_trip(cfg, tmp_path):
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # Through YAML text, with and without the top-level "model:" key.
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ModelConfig.from_yaml(path) == cfg
    path.write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert ModelConfig.from_yaml(path) == cfg
    assert cfg.target_hash() == ModelConfig.from_yaml(path).target_hash()
    flat = cfg.flat()
    assert flat["model.anchors.stride"] == cfg.anchors.stride
    assert flat["model.rpn.pos_iou"] == cfg.rpn.pos_iou


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  num_classes: 3\n  anchors:\n    scales: [2, 4]\n")
    cfg = ModelConfig.from_yaml(path)
    assert cfg.num_classes == 3
    assert cfg.anchors.scales == (2, 4) and cfg.anchors.ratios == (0.5, 1.0, 2.0)
    assert cfg.rpn == RPNConfig()


@pytest.mark.parametrize("data,key", [
    ({"num_clases": 3}, "num_clases"),
    ({"rpn": {"pos_iou": 0.7, "bogus_key": 1}}, "bogus_key"),
    ({"roi": {"poool": "align"}}, "poool"),
])
def test_config_unknown_keys_raise(data, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(data)


def test_config_validation():
    with pytest.raises(ValueError):
        ModelConfig(canvas=dataclasses.replace(ModelConfig().canvas, height=810))
    with pytest.raises(ValueError):
        ModelConfig(num_classes=2, class_names=("a",))


def test_target_hash_tracks_target_fields():
    cfg = tiny_config()
    h = cfg.target_hash()
    assert h == tiny_config().target_hash()
    changed = cfg.replace(anchors=AnchorConfig(stride=16, scales=(2.0, 4.0, 16.0)))
    assert changed.target_hash() != h
    assert cfg.replace(rpn=dataclasses.replace(cfg.rpn, pos_iou=0.6)).target_hash() != h
    assert cfg.replace(canvas=dataclasses.replace(cfg.canvas, width=208)).target_hash() != h
    # Things the anchor targets do not depend on leave the hash alone.
    assert cfg.replace(roi=RoIHeadConfig(batch_size_per_image=32)).target_hash() == h
    assert cfg.replace(rpn=dataclasses.replace(cfg.rpn, post_nms_top_n_train=50)).target_hash() == h


# ---- the paper's scale rule and aspect-ratio buckets -------------------------------------------
VOC_SIZES = [(375, 500), (500, 375), (333, 500), (500, 500)]  # (h, w): VOC's commonest
BUCKETS_3 = ((608, 1008), (1008, 608), (800, 800))
BUCKETS_7 = ((608, 800), (800, 608), (608, 912), (912, 608), (608, 608), (608, 1008), (1008, 608))


def test_scale_rule_short_side_600_long_side_at_most_1000():
    t = CanvasTransform(1008, 1008, 600, 1000)
    assert t.scale_for(375, 500) == pytest.approx(1.6) and t.resized_size(375, 500) == (600, 800)
    assert t.resized_size(500, 375) == (800, 600)
    assert t.scale_for(333, 500) == pytest.approx(600 / 333) and t.resized_size(333, 500) == (600, 901)
    # A very wide image: the long side caps the scale.
    assert t.scale_for(100, 2000) == pytest.approx(0.5) and t.resized_size(100, 2000) == (50, 1000)
    canvas, s = t.apply_image(Image.new("RGB", (500, 333), (9, 9, 9)))
    assert canvas.shape == (1008, 1008, 3) and s == pytest.approx(600 / 333)
    assert (canvas[:600, :901] == 9).all() and (canvas[600:] == 0).all() and (canvas[:, 901:] == 0).all()
    # No rule: the largest scale that fits (unchanged behaviour).
    assert CanvasTransform(1008, 1008).scale_for(375, 500) == pytest.approx(1008 / 500)
    assert CanvasTransform.from_config(ModelConfig().canvas) == CanvasTransform(800, 800)


def test_buckets_least_padding_and_the_padding_shares():
    one = CanvasTransform(800, 800)
    assert [round(one.padding_share(h, w), 5) for h, w in VOC_SIZES] == [0.25, 0.25, 0.33375, 0.0]
    three = CanvasTransform(608, 1008, 600, 1000, BUCKETS_3)
    assert [three.canvas_for(h, w) for h, w in VOC_SIZES] == [(608, 1008), (1008, 608), (608, 1008), (608, 1008)]
    assert [round(three.padding_share(h, w), 4) for h, w in VOC_SIZES] == [
        round(1 - 600 * 800 / (608 * 1008), 4), round(1 - 600 * 800 / (608 * 1008), 4),
        round(1 - 600 * 901 / (608 * 1008), 4), round(1 - 600 * 600 / (608 * 1008), 4)]  # 21.7, 21.7, 11.8, 41.3 %
    seven = CanvasTransform(608, 1008, 600, 1000, BUCKETS_7)
    assert [seven.canvas_for(h, w) for h, w in VOC_SIZES] == [(608, 800), (800, 608), (608, 912), (608, 608)]
    assert max(seven.padding_share(h, w) for h, w in VOC_SIZES) < 0.03
    # Every image keeps the rule's scale on its bucket; the canvas has the bucket's shape.
    for h, w in VOC_SIZES + [(100, 2000), (2000, 100)]:
        assert seven.scale_for(h, w) == pytest.approx(min(600 / min(h, w), 1000 / max(h, w)))
    canvas, s = seven.apply_image(Image.new("RGB", (375, 500)))
    assert canvas.shape == (800, 608, 3) and s == pytest.approx(1.6)
    # Without a rule: least padding, each bucket at its own fitting scale.
    free = CanvasTransform(608, 1008, buckets=BUCKETS_3)
    assert free.canvas_for(375, 500) == (608, 1008) and free.scale_for(375, 500) == pytest.approx(608 / 375)


def _canvas_cfg(**kw) -> ModelConfig:
    return ModelConfig(canvas=dataclasses.replace(ModelConfig().canvas, **kw))


def test_bad_canvas_rules_and_buckets_are_refused():
    with pytest.raises(ValueError, match="buckets entry 600x1000 must be positive multiples of the stride 16"):
        _canvas_cfg(height=608, width=1008, buckets=((608, 1008), (600, 1000)))
    with pytest.raises(ValueError, match="canvas 800x800 must be one of canvas.buckets"):
        _canvas_cfg(buckets=((608, 1008), (1008, 608)))
    with pytest.raises(ValueError, match="cannot hold every portrait image"):
        _canvas_cfg(height=608, width=1008, short_side=600, max_long_side=1000, buckets=((608, 1008), (800, 800)))
    with pytest.raises(ValueError, match="cannot hold every landscape and portrait image"):
        _canvas_cfg(short_side=600, max_long_side=1000)  # 800x800 < 1000
    with pytest.raises(ValueError, match="both 0"):
        _canvas_cfg(short_side=600)
    cfg = _canvas_cfg(height=608, width=1008, short_side=600, max_long_side=1000, buckets=BUCKETS_3)
    with pytest.raises(ValueError, match="one feature grid per bucket"):  # one grid each: feature_size_for
        _ = cfg.feature_size
    assert cfg.feature_size_for((1008, 608)) == (63, 38) and cfg.anchor_positions()[(608, 1008)] == 38 * 63 * 9
    with pytest.raises(ValueError, match="not one of the config's canvases"):
        cfg.feature_size_for((608, 608))
    # Buckets survive YAML (lists) as tuples; the rule and buckets key the precomputed targets,
    # and a config without them keeps the fields (and hash) it had before they existed.
    assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert cfg.target_fields()["canvas_buckets"] == [list(b) for b in BUCKETS_3]
    assert not any(k.startswith("canvas_") and k not in ("canvas_height", "canvas_width")
                   for k in ModelConfig().target_fields())


def test_the_voc_recipe():
    from frcnn.config import load_config

    cfg, train = load_config("vgg16_voc")
    assert cfg.backbone.name == "vgg16" and cfg.backbone.weights == "imagenet" and cfg.backbone.freeze_at == 2
    t = CanvasTransform.from_config(cfg.canvas)
    for h, w in VOC_SIZES + [(100, 2000), (2000, 100)]:  # the paper's scale, either orientation
        assert t.scale_for(h, w) == pytest.approx(min(600 / min(h, w), 1000 / max(h, w)))
    assert (cfg.roi.loc_weight, cfg.roi.smooth_l1_beta, cfg.roi.loc_normalizer) == (1.0, 1.0, "sampled")
    assert (cfg.rpn.loc_weight, cfg.rpn.loc_normalizer) == (1.0, "sampled")
    assert train["amp"] == "bf16" and train["weight_decay"] == 0.0005
    # Per image: 0.001 at one image; 8 workers x 1 image -> 0.008. 7 epochs of VOC07+12 ~ 110k images.
    from frcnn.training import TrainConfig

    tcfg = TrainConfig.from_dict(train)
    assert tcfg.lr_for(8 * tcfg.batch_size) == pytest.approx(0.008)
    assert tcfg.epochs * 16551 == pytest.approx(110_000, rel=0.06)
