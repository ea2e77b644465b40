"""Backbone weights loaded strictly from a state dict the test writes (never a download), freezing
by stages, dropout in every head, and the Caffe input format."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from frcnn import FasterRCNN, tiny_config, total_loss
from frcnn.backbones import WeightsError, build_backbone
from frcnn.config import BackboneConfig, CanvasConfig, ModelConfig, RoIHeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta_keys(ctor) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in ctor(weights=None).state_dict().items()}


# ---- strict loading --------------------------------------------------------------------------
def test_vgg16_state_dict_loads_every_layer_it_uses(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {k: torch.rand(shape, generator=g) for k, shape in _meta_keys(torchvision.models.vgg16).items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    torch.manual_seed(2)  # another init: every equal tensor below came from the file
    bb = build_backbone(BackboneConfig(name="vgg16", weights=str(path)), RoIHeadConfig(), 16)
    convs = [m for m in bb.body if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    conv_keys = [k for k in state if k.startswith("features.") and k.endswith(".weight")]
    for conv, key in zip(convs, conv_keys, strict=True):
        assert torch.equal(conv.weight, state[key]), key
    assert torch.equal(bb.head[1].weight, state["classifier.0.weight"])  # fc6
    assert torch.equal(bb.head[4].weight, state["classifier.3.weight"])  # fc7
    assert torch.equal(bb.head[4].bias, state["classifier.3.bias"])

    # The same file without fc6/fc7 (a features-only export) is refused, naming both layers...
    features_only = {k: v for k, v in state.items() if k.startswith("features.")}
    del state
    partial = tmp_path / "vgg16_features.pth"
    torch.save(features_only, partial)
    with pytest.raises(WeightsError) as e:
        build_backbone(BackboneConfig(name="vgg16", weights=str(partial)), RoIHeadConfig(), 16)
    msg = str(e.value)
    assert str(partial) in msg and "missing 4 key(s)" in msg
    for name in ("classifier.0.weight (fc6)", "classifier.0.bias (fc6)", "classifier.3.weight (fc7)"):
        assert name in msg
    # ... but loads for a head that does not use them (the light head on reduced channels).
    light = RoIHeadConfig(reduce_channels=16, representation_size=32)
    bb = build_backbone(BackboneConfig(name="vgg16", weights=str(partial)), light, 16)
    assert torch.equal(bb.body[28].weight, features_only["features.28.weight"])  # conv5_3


def test_wrong_files_are_refused_with_the_file_and_keys(tmp_path):
    # A ResNet-50 state dict given to VGG16 (its keys; small tensors suffice: keys are checked first).
    resnet = {k: torch.zeros(1) for k in _meta_keys(torchvision.models.resnet50)}
    path = tmp_path / "resnet50.pth"
    torch.save(resnet, path)
    with pytest.raises(WeightsError, match=r"not a vgg16 state dict.*looks like a resnet50") as e:
        build_backbone(BackboneConfig(name="vgg16", weights=str(path)), RoIHeadConfig(), 16)
    assert str(path) in str(e.value) and "conv1.weight" in str(e.value)

    # A MobileNet dict with one foreign key and one wrong shape: both named.
    mb = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    mb["features.0.0.weight"] = mb["features.0.0.weight"][:8]
    mb["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "mobilenet_bad.pth"
    torch.save(mb, bad)
    with pytest.raises(WeightsError) as e:
        build_backbone(BackboneConfig(name="mobilenet_v3", weights=str(bad)), RoIHeadConfig(), 16)
    msg = str(e.value)
    assert str(bad) in msg and "unexpected 1 key(s): extra.weight" in msg
    assert "features.0.0.weight (8, 3, 3, 3) (model (16, 3, 3, 3))" in msg
    # Keys of layers the detector drops (MobileNet's classifier) are fine; the original loads.
    del mb["extra.weight"]
    mb["features.0.0.weight"] = torch.randn(16, 3, 3, 3)
    torch.save(mb, bad)
    bb = build_backbone(BackboneConfig(name="mobilenet_v3", weights=str(bad)), RoIHeadConfig(), 16)
    assert torch.equal(bb.body[0][0].weight, mb["features.0.0.weight"])

    # A training checkpoint instead of a bare state dict; a file that is no state dict at all.
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"features.0.weight": torch.zeros(1)}, "epoch": 3}, wrapped)
    with pytest.raises(WeightsError, match="'state_dict' entry"):
        build_backbone(BackboneConfig(name="vgg16", weights=str(wrapped)), RoIHeadConfig(), 16)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pth: not a PyTorch state dict"):
        build_backbone(BackboneConfig(name="tiny", weights=str(junk)), RoIHeadConfig(), 16)
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_backbone(BackboneConfig(name="tiny", weights="imagenet"), RoIHeadConfig(), 16)


def test_tiny_weights_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    src = build_backbone(BackboneConfig(name="tiny"), RoIHeadConfig(representation_size=16), 16)
    path = tmp_path / "tiny.pth"
    torch.save(src.body.state_dict(), path)
    torch.manual_seed(1)
    dst = build_backbone(BackboneConfig(name="tiny", weights=str(path)), RoIHeadConfig(representation_size=16), 16)
    for (k, a), b in zip(src.body.state_dict().items(), dst.body.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsError, match=r"tiny\.pth for tiny\(8, 16, 32, 64\)"):
        build_backbone(BackboneConfig(name="tiny", weights=str(path), tiny_channels=(8, 16, 32, 64)),
                       RoIHeadConfig(representation_size=16), 16)


# ---- freezing --------------------------------------------------------------------------------
def test_vgg16_freeze_at_2_fixes_conv1_and_conv2():
    bb = build_backbone(BackboneConfig(name="vgg16", freeze_at=2), RoIHeadConfig(reduce_channels=8,
                                                                               representation_size=16), 16)
    convs = [(i, m) for i, m in enumerate(bb.body) if isinstance(m, nn.Conv2d)]
    frozen = [i for i, m in convs if not m.weight.requires_grad and not m.bias.requires_grad]
    assert frozen == [0, 2, 5, 7]  # conv1_1, conv1_2, conv2_1, conv2_2 (py-faster-rcnn)
    assert all(m.weight.requires_grad for i, m in convs if i > 7)
    with pytest.raises(ValueError, match="freeze_at 6: vgg16 has 5 stages"):
        build_backbone(BackboneConfig(name="vgg16", freeze_at=6), RoIHeadConfig(), 16)


def test_resnet50_freeze_at_2_fixes_stem_and_layer1():
    bb = build_backbone(BackboneConfig(name="resnet50", freeze_at=2), RoIHeadConfig(), 16)
    stem_and_layer1, rest = list(bb.body)[:5], list(bb.body)[5:]
    assert all(not p.requires_grad for m in stem_and_layer1 for p in m.parameters())
    assert all(p.requires_grad for m in rest for p in m.parameters())
    # Frozen stages' BatchNorm is FrozenBatchNorm2d (statistics fixed too); later stages train theirs.
    assert isinstance(bb.body[1], FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for s in stem_and_layer1 for m in s.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bb.body[5].modules())


def test_frozen_tiny_stages_do_not_change_in_a_training_step():
    torch.manual_seed(0)
    cfg = tiny_config(num_classes=2, canvas=64)
    cfg = cfg.replace(backbone=dataclasses.replace(cfg.backbone, freeze_at=2))
    model = FasterRCNN(cfg).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 48.0]]), torch.tensor([[20.0, 4.0, 60.0, 30.0]])]
    total_loss(model(images, {"boxes": boxes, "labels": [torch.tensor([1]), torch.tensor([2])]})).backward()
    opt.step()
    after = model.backbone.state_dict()
    # Stages 1-2 are children 0-3: weights and BatchNorm statistics unchanged; stage 3 trained.
    for k, v in before.items():
        stage_child = int(k.split(".")[0])
        same = torch.equal(v, after[k])
        assert same if stage_child < 4 else True, k
    assert not torch.equal(before["4.0.weight"], after["4.0.weight"])
    assert not torch.equal(before["4.1.running_mean"], after["4.1.running_mean"])


# ---- dropout in every head -------------------------------------------------------------------
@pytest.mark.parametrize("name,roi", [
    ("vgg16", RoIHeadConfig()),
    ("resnet50", RoIHeadConfig()),
    ("mobilenet_v3", RoIHeadConfig(representation_size=32)),
    ("tiny", RoIHeadConfig(representation_size=32)),
])
def test_roi_dropout_is_honoured_by_every_head(name, roi):
    for p in (0.0, 0.3):
        bb = build_backbone(BackboneConfig(name=name), dataclasses.replace(roi, dropout=p), 16)
        drops = [m for m in bb.head.modules() if isinstance(m, nn.Dropout)]
        if p == 0:
            assert drops == []
        else:
            assert drops and all(m.p == p for m in drops)
    # Behaviour, on the head built last (p = 0.3): in train mode two passes differ, in eval not.
    channels = bb.out_channels
    x = torch.randn(2, channels, roi.pool_size, roi.pool_size)
    bb.head.train()
    with torch.no_grad():
        assert not torch.equal(bb.head(x), bb.head(x))
        bb.head.eval()
        assert torch.equal(bb.head(x), bb.head(x))


# ---- Caffe input format ----------------------------------------------------------------------
CAFFE_MEAN = (102.9801, 115.9465, 122.7717)  # py-faster-rcnn's PIXEL_MEANS, BGR


def test_caffe_input_format_is_bgr_0_255_minus_mean():
    cfg = tiny_config(num_classes=2, canvas=32)
    caffe = cfg.replace(backbone=dataclasses.replace(cfg.backbone, input_format="caffe"),
                        canvas=CanvasConfig(height=32, width=32, mean=CAFFE_MEAN, std=(1.0, 1.0, 1.0)))
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, 0], image[0, 1], image[0, 2] = 200, 100, 50  # R, G, B
    x = FasterRCNN(caffe).normalize(image)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([50 - 102.9801, 100 - 115.9465, 200 - 122.7717]))
    # Float input in 0..1 means the same image.
    torch.testing.assert_close(FasterRCNN(caffe).normalize(image.float() / 255), x)
    # torchvision format: RGB 0..1, standardised.
    y = FasterRCNN(cfg).normalize(image)
    torch.testing.assert_close(y[0, :, 0, 0], (torch.tensor([200, 100, 50]) / 255 - torch.tensor(cfg.canvas.mean))
                               / torch.tensor(cfg.canvas.std))
    # A mean in the other format's units is refused (a 255x error would otherwise go unseen).
    with pytest.raises(ValueError, match="input_format caffe takes canvas.mean in BGR 0..255"):
        cfg.replace(backbone=dataclasses.replace(cfg.backbone, input_format="caffe"))
    with pytest.raises(ValueError, match="input_format torchvision takes canvas.mean in RGB 0..1"):
        ModelConfig(canvas=CanvasConfig(mean=CAFFE_MEAN))
    with pytest.raises(ValueError, match="torchvision or caffe"):
        ModelConfig(backbone=BackboneConfig(input_format="bgr"))
