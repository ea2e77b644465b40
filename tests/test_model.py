"""The detector end to end on CPU: losses, precomputed targets, detect(), overfitting, autocast,
RoI pooling variants and backbones."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou, roi_pool

from frcnn import LOSS_KEYS, total_loss
from frcnn.anchors import grid_anchors
from frcnn.backbones import build_backbone
from frcnn.config import BackboneConfig, RoIHeadConfig
from tests.shapes import CANVAS, NUM_CLASSES, make_images, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_detections(dets, n_images: int, height: float, width: float):
    assert len(dets) == n_images
    for d in dets:
        assert set(d) == {"boxes", "scores", "labels"}
        b, s, lab = d["boxes"], d["scores"], d["labels"]
        assert b.ndim == 2 and b.shape[1] == 4 and b.shape[0] == s.shape[0] == lab.shape[0]
        assert torch.isfinite(b).all() and torch.isfinite(s).all()
        assert bool((b[:, 0] >= 0).all() and (b[:, 1] >= 0).all())
        assert bool((b[:, 2] <= width).all() and (b[:, 3] <= height).all())
        assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all())
        assert bool(((s >= 0) & (s <= 1)).all())
        assert bool(((lab >= 1) & (lab <= NUM_CLASSES)).all())


# ---- losses -----------------------------------------------------------------------------------
def test_losses_keys_finite_and_backward():
    model = make_model().train()
    images, boxes, labels = make_images(3)
    # One image without objects: background only.
    boxes[2], labels[2] = torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)
    losses = model(images, {"boxes": boxes, "labels": labels})
    assert tuple(LOSS_KEYS) == ("loss_rpn_cls", "loss_rpn_loc", "loss_roi_cls", "loss_roi_loc")
    assert set(losses) == set(LOSS_KEYS)
    for k, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), k
    assert losses["loss_rpn_cls"] > 0 and losses["loss_roi_cls"] > 0
    total_loss(losses).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.rpn_head.bbox_pred.weight.grad.abs().sum() > 0
    assert model.roi_heads.bbox_pred.weight.grad.abs().sum() > 0


def test_model_rejects_wrong_canvas_and_missing_targets():
    model = make_model()
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, CANVAS, CANVAS + 16, dtype=torch.uint8), None)
    with pytest.raises(ValueError):
        model.train()(torch.zeros(1, 3, CANVAS, CANVAS, dtype=torch.uint8))


def test_anchors_match_head_outputs():
    model = make_model()
    fh, fw = model.cfg.feature_size
    assert model.anchors.shape == (model.cfg.num_anchor_positions, 4)
    with torch.no_grad():
        feats = model.backbone(model.normalize(torch.zeros(1, 3, CANVAS, CANVAS, dtype=torch.uint8)))
        logits, deltas = model.rpn_head(feats)
    assert feats.shape[-2:] == (fh, fw)
    assert logits.shape[1] == deltas.shape[1] == model.anchors.shape[0]
    # The model's anchors are in the head's (y-major) order: index A is cell (y=0, x=1).
    a, s = model.cfg.anchors, model.cfg.anchors.stride
    assert torch.equal(model.anchors, grid_anchors(fh, fw, s, a.scales, a.ratios))
    centres = (model.anchors[:, :2] + model.anchors[:, 2:]) / 2
    torch.testing.assert_close(centres[a.num_anchors], torch.tensor([1.5 * s, 0.5 * s]))
    torch.testing.assert_close(centres[fw * a.num_anchors], torch.tensor([0.5 * s, 1.5 * s]))


def test_precomputed_anchor_targets_give_the_same_losses():
    model = make_model().train()
    images, boxes, labels = make_images(3)
    boxes[1], labels[1] = torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64)
    a_labels, a_deltas = model.anchor_targets(boxes)
    n = model.anchors.shape[0]
    assert a_labels.shape == (3, n) and a_labels.dtype == torch.int8 and a_deltas.shape == (3, n, 4)
    assert bool((a_labels[0] == 1).any()) and not bool((a_labels[1] == 1).any())

    torch.manual_seed(123)
    own = model(images, {"boxes": boxes, "labels": labels})
    torch.manual_seed(123)
    pre = model(images, {"boxes": boxes, "labels": labels, "anchor_labels": a_labels, "anchor_deltas": a_deltas})
    for k in LOSS_KEYS:
        torch.testing.assert_close(pre[k], own[k], rtol=1e-6, atol=1e-7, msg=k)

    # ... and the precomputed targets are what the RPN loss uses: all ignored -> zero RPN losses.
    torch.manual_seed(123)
    ignored = model(images, {"boxes": boxes, "labels": labels,
                             "anchor_labels": torch.full_like(a_labels, -1), "anchor_deltas": a_deltas})
    assert float(ignored["loss_rpn_cls"].detach()) == 0.0 and float(ignored["loss_rpn_loc"].detach()) == 0.0
    torch.testing.assert_close(ignored["loss_roi_cls"], own["loss_roi_cls"])


def test_given_proposals_replace_the_rpns():
    model = make_model().train()
    images, boxes, labels = make_images(2)
    targets = {"boxes": boxes, "labels": labels}
    props = model.propose(images)
    cfg = model.cfg.rpn
    assert [p.shape[1] for p in props] == [4, 4]
    assert all(0 < p.shape[0] <= cfg.post_nms_top_n_train for p in props)
    assert all(bool(((p >= 0) & (p <= CANVAS)).all()) for p in props)
    assert all(p.shape[0] <= cfg.post_nms_top_n_test for p in model.eval().propose(images))
    model.train()

    # The RPN's own proposals passed in: the very same losses as without.
    torch.manual_seed(5)
    own = model(images, targets)
    torch.manual_seed(5)
    given = model(images, targets, props)
    for k in LOSS_KEYS:
        torch.testing.assert_close(given[k], own[k], rtol=0, atol=0, msg=k)

    # Other proposals change the head's losses only. No proposals at all: the RoIs are the
    # ground-truth boxes (the head always adds them), all foreground with zero box targets, so
    # the head's losses are those of its outputs on the boxes themselves, computed here directly.
    torch.manual_seed(5)
    gt_only = model(images, targets, [b[:0] for b in boxes])
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(gt_only[k], own[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        cls, deltas = model.roi_heads.predict(model.backbone(model.normalize(images)), boxes)
        lab = torch.cat(labels)
        pred = deltas.reshape(lab.numel(), -1, 4)[torch.arange(lab.numel()), lab]
        beta = model.cfg.roi.smooth_l1_beta
        expected_loc = torch.where(pred.abs() < beta, 0.5 * pred**2 / beta, pred.abs() - 0.5 * beta).sum() / lab.numel()
        expected_cls = -torch.log_softmax(cls, dim=1)[torch.arange(lab.numel()), lab].mean()
    torch.testing.assert_close(gt_only["loss_roi_loc"].detach(), expected_loc, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gt_only["loss_roi_cls"].detach(), expected_cls, rtol=1e-4, atol=1e-6)
    assert float(gt_only["loss_roi_loc"].detach()) < float(own["loss_roi_loc"].detach())

    # Eval: detections are decoded from the given proposals.
    model.eval()
    with torch.no_grad():
        dets = model(images, None, [b.clone() for b in boxes])
    for d, b in zip(dets, boxes, strict=True):
        assert d["boxes"].shape[0] > 0
        assert float(box_iou(d["boxes"], b).max(dim=1).values.min()) > 0.9


# ---- detection and the way back to the original image -----------------------------------------
def test_detect_boxes_inside_original_images():
    model = make_model()
    images, _, _ = make_images(2)
    # Originals 100x60 (h x w) and 50x128, resized onto the 128 canvas.
    orig_sizes = [(100, 60), (50, 128)]
    scales = [min(CANVAS / h, CANVAS / w) for h, w in orig_sizes]
    assert scales == [1.28, 1.0]
    model.train()
    dets = model.detect(images, scales, orig_sizes)
    assert model.training  # detect() restores the mode it found
    for d, (h, w) in zip(dets, orig_sizes, strict=True):
        assert d["boxes"].shape[0] > 0  # a random head still scores above 0.05
        _check_detections([d], 1, h, w)
    # Without detect(): canvas boxes, inside the canvas.
    with torch.no_grad():
        _check_detections(model.eval()(images), 2, CANVAS, CANVAS)


def test_detect_maps_a_known_canvas_box_back(monkeypatch):
    model = make_model()
    canvas_boxes = torch.tensor([[16.0, 32.0, 64.0, 96.0], [100.0, 20.0, 128.0, 128.0]])

    def fake_forward(images, targets=None):
        return [{"boxes": canvas_boxes.clone(), "scores": torch.tensor([0.9, 0.8]),
                 "labels": torch.tensor([1, 2])} for _ in range(images.shape[0])]

    monkeypatch.setattr(model, "forward", fake_forward)
    images = torch.zeros(2, 3, CANVAS, CANVAS, dtype=torch.uint8)
    dets = model.detect(images, [1.28, 0.5], [(100, 60), (256, 256)])
    # Image 0: scale 1.28, original 100x60: the first box maps to box / 1.28; the second lies in
    # the padding to the right of the 76.8-px-wide resized image and is clipped to the original.
    torch.testing.assert_close(dets[0]["boxes"][0], torch.tensor([12.5, 25.0, 50.0, 75.0]))
    torch.testing.assert_close(dets[0]["boxes"][1], torch.tensor([60.0, 15.625, 60.0, 100.0]))
    # Image 1: scale 0.5 (a 256x256 original on the 128 canvas): boxes double.
    torch.testing.assert_close(dets[1]["boxes"], canvas_boxes * 2)
    assert dets[0]["labels"].tolist() == [1, 2]
    torch.testing.assert_close(dets[1]["scores"], torch.tensor([0.9, 0.8]))


# ---- overfitting: the whole pipeline learns ---------------------------------------------------
def test_overfit_tiny_dataset(tiny_trained_model):
    """The tiny_trained_model fixture: 200 SGD steps on 4 canvases, every step's loss finite."""
    trained = tiny_trained_model(4, 200)
    model, images, boxes, labels, history = (trained.model, trained.images, trained.boxes, trained.labels,
                                             trained.history)
    model.eval()
    with torch.no_grad():
        dets = model(images)
    misses = []
    for i, (d, b, lab) in enumerate(zip(dets, boxes, labels, strict=True)):
        for j in range(b.shape[0]):
            if d["boxes"].shape[0] == 0:
                misses.append((i, j, "no detections"))
                continue
            iou = box_iou(b[j:j + 1], d["boxes"])[0]
            hit = (iou > 0.7) & (d["labels"] == lab[j]) & (d["scores"] > 0.5)
            if not bool(hit.any()):
                k = int(iou.argmax())
                misses.append((i, j, int(lab[j]), round(float(iou[k]), 3), int(d["labels"][k]),
                               round(float(d["scores"][k]), 3)))
    assert not misses, f"missed (image, box, class, best IoU, its class, its score): {misses}\nlosses: {history}"
    # Near-perfect: no confident false positive either (a detection > 0.5 that hits no object).
    for d, b in zip(dets, boxes, strict=True):
        confident = d["boxes"][d["scores"] > 0.5]
        if confident.shape[0]:
            assert bool((box_iou(confident, b).max(dim=1).values > 0.5).all()), history


# ---- mixed precision and RoI pooling variants -------------------------------------------------
def test_autocast_bfloat16_train_and_eval():
    model = make_model()
    images, boxes, labels = make_images(2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, {"boxes": boxes, "labels": labels})
    assert set(losses) == set(LOSS_KEYS)
    for k, v in losses.items():
        assert torch.isfinite(v), k
    total_loss(losses).backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model(images)
    _check_detections(dets, 2, CANVAS, CANVAS)
    assert all(d["boxes"].dtype == torch.float32 for d in dets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mapped = model.detect(images, [1.28, 1.28], [(100, 100), (100, 100)])
    _check_detections(mapped, 2, 100, 100)


def test_roi_pool_option():
    model = make_model(pool="pool")
    assert model.cfg.roi.pool == "pool"
    images, boxes, labels = make_images(2)
    feats = torch.randn(2, 128, CANVAS // 16, CANVAS // 16)
    rois = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 120.0, 90.0]]),
            torch.tensor([[32.0, 0.0, 128.0, 128.0]])]
    with torch.no_grad():
        expected = roi_pool(model.roi_heads.reduce(feats), rois, (7, 7), 1.0 / 16)
        torch.testing.assert_close(model.roi_heads.pool(feats, rois), expected)
    model.train()
    losses = model(images, {"boxes": boxes, "labels": labels})
    assert all(torch.isfinite(v) for v in losses.values())
    total_loss(losses).backward()
    with torch.no_grad():
        _check_detections(model.eval()(images), 2, CANVAS, CANVAS)
    with pytest.raises(ValueError, match="pool"):
        make_model(pool="bogus").roi_heads.pool(feats, rois)


# ---- backbones --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,channels", [("vgg16", 512), ("resnet50", 1024), ("mobilenet_v3", 112), ("tiny", 128)])
def test_backbone_stride_and_channels(name, channels):
    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name=name, weights=None), RoIHeadConfig(), 16)
    assert bb.out_channels == channels and bb.stride == 16
    bb.body.eval()
    bb.head.eval()
    with torch.no_grad():
        feats = bb.body(torch.randn(1, 3, 64, 64))
        assert feats.shape == (1, channels, 4, 4)
        assert torch.isfinite(feats).all()
        out = bb.head(torch.randn(2, channels, 7, 7))
    assert out.shape == (2, bb.head_out)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(BackboneConfig(name="alexnet"), RoIHeadConfig(), 16)
    with pytest.raises(ValueError, match="stride"):  # three stride-2 stages: stride 8, not 16
        build_backbone(BackboneConfig(name="tiny", tiny_channels=(8, 16, 32)), RoIHeadConfig(), 16)
    with pytest.raises(FileNotFoundError):
        build_backbone(BackboneConfig(name="mobilenet_v3", weights="/nonexistent/weights.pth"), RoIHeadConfig(), 16)
