"""A training step that never waits for the host: the ops of one step (forward, backward) traced
on CPU contain no host read-back (``nonzero``, ``.item()``, boolean indexing, ...) except NMS,
whose output length depends on the data; and each rewritten piece gives what the boolean-index
version gives (the references below), exactly or within float rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import box_iou, nms

from frcnn import total_loss
from frcnn.anchors import sample_anchor_labels
from frcnn.boxes import BoxCoder, clip_boxes
from frcnn.config import RoIHeadConfig, RPNConfig
from frcnn.roi_heads import ProposalTargetCreator, RoIHeads
from frcnn.rpn import ProposalLayer, rpn_loss
from tests.shapes import make_images, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Ops that read a device value back to the host (or whose output size depends on the data).
SYNC_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::masked_select", "aten::is_nonzero",
            "aten::unique_consecutive", "aten::_unique2", "aten::randperm", "aten::nonzero_static"}
KEPT = {"torchvision::nms"}  # data-dependent length by nature: the one sync of the proposal layer


class OpTrace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.kept: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # boolean indices (args[1]) make index/index_put read a count back
        if name in KEPT:
            self.kept.append(name)
        elif name in SYNC_OPS or (name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in _flat(args[1:2]))):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def test_a_training_step_has_no_host_sync_but_nms():
    model = make_model(seed=0).train()
    images, boxes, labels = make_images(2)
    a_labels, a_deltas = model.anchor_targets(boxes)  # precomputed in training (the shards)
    targets = {"boxes": boxes, "labels": labels, "anchor_labels": a_labels, "anchor_deltas": a_deltas}
    flip = torch.tensor([True, False])
    from frcnn.training import hflip_batch  # on the host's batch, before it moves to the device

    images, targets = hflip_batch(images, targets, flip, model.cfg)
    with OpTrace() as trace:
        loss = total_loss(model(images, targets))
        loss.backward()
    assert trace.syncs == [], sorted(set(trace.syncs))
    assert trace.kept == ["torchvision::nms"] * 2  # one per image


# ---- references: the boolean-index forms ---------------------------------------------------------
def _reference_proposals(cfg: RPNConfig, bx, sc, pre_n, post_n):
    wh = bx[:, 2:] - bx[:, :2]
    keep = torch.nonzero((wh >= cfg.min_size).all(dim=1)).flatten()
    bx, sc = bx[keep], sc[keep]
    if sc.numel() > pre_n:
        sc, top = sc.topk(pre_n)
        bx = bx[top]
    return bx[nms(bx, sc, cfg.nms_thresh)[:post_n]]


def test_proposals_equal_removing_small_boxes_first():
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    n = 3000
    anchors = torch.rand(n, 2, generator=g) * 200
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(n, 2, generator=g) * 60], 1)
    for min_size, pre_n in ((16.0, 1200), (40.0, 2500), (60.0, 5000)):  # many small ones; fewer valid than pre_n
        cfg = RPNConfig(min_size=min_size, pre_nms_top_n_train=pre_n, post_nms_top_n_train=300)
        logits = torch.randn(2, n, 2, generator=g)
        deltas = torch.randn(2, n, 4, generator=g) * 0.2
        got = ProposalLayer(cfg, coder)(anchors, logits, deltas, (240, 260), training=True)
        boxes = clip_boxes(coder.decode(deltas.reshape(-1, 4), anchors.repeat(2, 1)).reshape(2, n, 4), 240, 260)
        scores = logits[..., 1] - logits[..., 0]
        for i in range(2):
            want = _reference_proposals(cfg, boxes[i], scores[i], pre_n, 300)
            assert torch.equal(got[i], want), (min_size, pre_n, got[i].shape, want.shape)


def test_rpn_loss_equals_the_indexed_positives():
    g = torch.Generator().manual_seed(1)
    cfg = RPNConfig(loc_normalizer="positives")
    labels = torch.randint(-1, 2, (2, 900), generator=g).to(torch.int8)
    logits, deltas = torch.randn(2, 900, 2, generator=g), torch.randn(2, 900, 4, generator=g)
    target = torch.randn(2, 900, 4, generator=g)
    got = rpn_loss(cfg, logits, deltas, labels, target, (10, 10), torch.Generator().manual_seed(5))
    sampled = sample_anchor_labels(labels, cfg.batch_size_per_image, cfg.positive_fraction,
                                   torch.Generator().manual_seed(5)).reshape(-1)
    pos = sampled == 1
    loc = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], target.reshape(-1, 4)[pos], beta=cfg.smooth_l1_beta,
                           reduction="sum") / pos.sum()
    torch.testing.assert_close(got["loss_rpn_loc"], cfg.loc_weight * loc, rtol=1e-6, atol=0)


def _reference_sample(cfg: RoIHeadConfig, coder, proposals, gt_boxes, gt_labels, keys):
    """The index form: random subsets as index lists, in the order of the same uniform keys."""
    rois = torch.cat([proposals, gt_boxes])
    max_iou, matched = box_iou(rois, gt_boxes).max(dim=1)
    fg = torch.nonzero(max_iou >= cfg.fg_iou).flatten()
    bg = torch.nonzero((max_iou < cfg.bg_iou_hi) & (max_iou >= cfg.bg_iou_lo)).flatten()
    n_fg = min(int(cfg.batch_size_per_image * cfg.positive_fraction), fg.numel())
    fg = fg[keys[fg].argsort()[:n_fg]]
    bg = bg[keys[bg].argsort()[:min(cfg.batch_size_per_image - n_fg, bg.numel())]]
    keep = torch.cat([fg, bg])
    labels = torch.zeros(keep.numel(), dtype=torch.long)
    labels[:n_fg] = gt_labels[matched[fg]]
    targets = torch.zeros((keep.numel(), 4))
    targets[:n_fg] = coder.encode(gt_boxes[matched[fg]], rois[fg])
    return rois[keep], labels, targets


def test_roi_sample_equals_the_index_form_and_fills_with_ignored_rois():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    gt_boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [100.0, 40.0, 180.0, 90.0]])
    gt_labels = torch.tensor([2, 5])
    for n_props, batch in ((400, 64), (30, 128)):  # plenty of candidates; fewer than the batch
        g = torch.Generator().manual_seed(n_props)
        centre = gt_boxes[torch.randint(0, 2, (n_props,), generator=g)]
        proposals = centre + torch.randn(n_props, 4, generator=g) * 12
        proposals = torch.cat([proposals[:, :2], torch.maximum(proposals[:, 2:], proposals[:, :2] + 2)], 1)
        cfg = RoIHeadConfig(batch_size_per_image=batch)
        rois, labels, targets = ProposalTargetCreator(cfg, coder)(proposals, gt_boxes, gt_labels,
                                                                  torch.Generator().manual_seed(9))
        keys = torch.rand(n_props + 2, generator=torch.Generator().manual_seed(9))
        want_rois, want_labels, want_targets = _reference_sample(cfg, coder, proposals, gt_boxes, gt_labels, keys)
        real = labels >= 0
        assert rois.shape[0] == min(batch, n_props + 2) and bool(real[:int(real.sum())].all())
        assert torch.equal(rois[real], want_rois) and torch.equal(labels[real], want_labels)
        torch.testing.assert_close(targets[real], want_targets, rtol=0, atol=0)
        assert (labels > 0).sum() <= batch * cfg.positive_fraction
        if n_props + 2 > batch:
            assert bool(real.all())


def test_roi_loss_ignores_filler_rois():
    g = torch.Generator().manual_seed(2)
    head = RoIHeads(RoIHeadConfig(), torch.nn.Identity(), 8, 4, 16, 8)
    labels = torch.tensor([3, 1, 0, 0, 2, 0, -1, -1])
    logits, deltas, targets = torch.randn(8, 4, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, 4,
                                                                                                            generator=g)
    got = head.loss(logits, deltas, labels, torch.where((labels > 0)[:, None], targets, 0.0))
    real = labels >= 0
    want_cls = F.cross_entropy(logits[real], labels[real])
    fg = torch.nonzero(labels > 0).flatten()
    pred = deltas.reshape(8, -1, 4)[fg, labels[fg]]
    want_loc = F.smooth_l1_loss(pred, targets[fg], beta=head.cfg.smooth_l1_beta, reduction="sum") / int(real.sum())
    torch.testing.assert_close(got["loss_roi_cls"], want_cls, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["loss_roi_loc"], want_loc, rtol=1e-6, atol=0)


def test_a_diverged_model_pools_only_finite_rois(monkeypatch):
    """NaN weights: NaN boxes count as small (as when they were filtered out), and filler RoIs are
    finite boxes, so RoI pooling never sees a NaN coordinate; the losses come out NaN, to be caught."""
    from frcnn import roi_heads

    model = make_model(seed=0).train()
    images, boxes, labels = make_images(2)
    a_labels, a_deltas = model.anchor_targets(boxes)
    with torch.no_grad():
        model.rpn_head.bbox_pred.weight.fill_(float("nan"))
    pooled = []
    real_align = roi_heads.roi_align
    monkeypatch.setattr(roi_heads, "roi_align", lambda f, b, *a, **k: pooled.append(torch.cat(b)) or real_align(
        f, b, *a, **k))
    losses = model(images, {"boxes": boxes, "labels": labels, "anchor_labels": a_labels, "anchor_deltas": a_deltas})
    assert pooled and all(bool(torch.isfinite(b).all()) for b in pooled)
    assert not torch.isfinite(total_loss(losses))
