"""Mixed precision on CPU autocast: boxes, RoIs, objectness, deltas and scores stay float32; only
convolutions and linear layers run in bfloat16/float16; losses and detections match float32.

The tolerance. bfloat16 keeps 8 significant bits: unit roundoff u = 2**-8 (0.39 %). A layer run
under autocast rounds its inputs and weights to that (accumulating in float32), so each low-precision
layer adds a relative error of order u; independent roundings add in quadrature, and the ~10 such
layers of the tiny net (16 for VGG16 with fc6/fc7) leave the network's outputs with a relative error
of order sqrt(10..16) u = 3-4 u. A loss is a smooth function of those outputs, so it moves by at most
about the same relative amount, less where it is flat in them (at initialisation), more where it is
the square of a small residual (a trained model's box losses: smooth L1 in its quadratic part doubles
the relative error of the residual). Tolerance: 4 u = 2**-6 = 1.56 % on every loss and on the head's
outputs (relative L2 norm of the class logits and of the deltas). Measured here (CPU, torch 2.14,
in units of u): losses at initialisation 0.003-0.03 u (tiny) and 0-0.006 u (VGG16); on the tiny
model trained below 0.08-0.45 u, on one trained longer on 4 images up to 2.3 u (box losses); the
head's outputs 0.5-2.9 u (tiny), 1.8-2.8 u (VGG16). Deterministic on one machine; the margin (1.4x
at worst) is for other CPUs' bfloat16 kernels.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align

from frcnn import LOSS_KEYS, FasterRCNN, roi_heads
from frcnn.config import AnchorConfig, CanvasConfig, ModelConfig, RoIHeadConfig, RPNConfig
from frcnn.inference import Detector
from tests.shapes import make_images, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

U_BF16 = 2.0**-8
RTOL = 4 * U_BF16
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def trained(tiny_trained_model):
    """A tiny detector overfitted on two generated canvases (80 SGD steps, float32)."""
    t = tiny_trained_model(n_images=2, steps=80)
    return t.model.train(), t.images, t.boxes, t.labels


def _step_losses(model: FasterRCNN, images, boxes, labels, dtype, seed: int = 0) -> dict[str, float]:
    """One training step's losses; the same anchor sample, proposals and RoI sample as float32
    (proposals computed once in float32), so only the arithmetic differs."""
    model.train()
    a_labels, a_deltas = model.anchor_targets(boxes)
    targets = {"boxes": boxes, "labels": labels, "anchor_labels": a_labels, "anchor_deltas": a_deltas}
    props = model.propose(images)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        losses = model(images, targets, props)
    return {k: float(v.detach()) for k, v in losses.items()}


def _head_outputs(model: FasterRCNN, images, rois, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        features = model.backbone(model.normalize(images))
        return model.roi_heads.predict(features, rois)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- what reaches the pooling ------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["align", "pool"])
@pytest.mark.parametrize("dtype", LOW)
def test_rois_reach_pooling_in_float32(monkeypatch, pool, dtype):
    seen = []
    name = "roi_align" if pool == "align" else "roi_pool"
    real = getattr(roi_heads, name)

    def spy(features, boxes, *args, **kwargs):
        seen.append((features.dtype, [b.dtype for b in boxes]))
        return real(features, boxes, *args, **kwargs)

    monkeypatch.setattr(roi_heads, name, spy)
    model = make_model(pool=pool)
    images, boxes, labels = make_images(2)
    with torch.autocast("cpu", dtype=dtype):
        losses = model.train()(images, {"boxes": boxes, "labels": labels})
        with torch.no_grad():
            dets = model.eval()(images)
    assert len(seen) == 2  # training and inference
    assert all(f == torch.float32 and set(b) == {torch.float32} for f, b in seen), seen
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert all(d[k].dtype == torch.float32 for d in dets for k in ("boxes", "scores"))


@pytest.mark.parametrize("dtype", LOW)
def test_pooled_features_equal_pooling_with_float32_boxes(dtype):
    """The issue's RoI on an 800x1024 canvas: pooled as given, not as [516, 300, 800, 612]."""
    torch.manual_seed(0)
    model = make_model(pool="align")
    heads = model.roi_heads
    features = torch.randn(1, 128, 50, 64)
    roi = torch.tensor([[517.9, 300.3, 798.0, 611.7]])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        reduced = heads.reduce(features)  # the 1x1 conv runs low: its output is what gets pooled
        pooled = heads.pool(features, [roi])
    assert reduced.dtype == dtype and pooled.dtype == torch.float32
    p, scale, ratio = model.cfg.roi.pool_size, 1 / 16, model.cfg.roi.sampling_ratio
    expected = roi_align(reduced.float(), [roi], (p, p), scale, ratio, aligned=True)
    assert torch.equal(pooled, expected)
    # What the rounded box would have pooled: measurably different (the bug this guards against).
    rounded = roi_align(reduced.float(), [roi.to(dtype).float()], (p, p), scale, ratio, aligned=True)
    if dtype == torch.bfloat16:
        assert roi.to(dtype).float().tolist() == [[516.0, 300.0, 800.0, 612.0]]
        assert _rel(rounded, expected) > 0.02


@pytest.mark.parametrize("dtype", LOW)
def test_rpn_outputs_and_proposals_are_float32(dtype):
    model = make_model()
    images, _, _ = make_images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        features = model.backbone(model.normalize(images))
        logits, deltas = model.rpn_head(features)
        props = model.eval().propose(images)
    assert features.dtype == dtype  # the convolutions do run low
    assert logits.dtype == deltas.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in props)
    # Objectness from float32 logits: as many distinct scores as float32 gives, not bf16's few.
    with torch.no_grad():
        ref_logits, _ = model.rpn_head(features.float())
    score = logits[..., 1] - logits[..., 0]
    ref_score = ref_logits[..., 1] - ref_logits[..., 0]
    assert score.unique().numel() > 0.9 * ref_score.unique().numel()


# ---- losses and detections against float32 ----------------------------------------------------
def test_bf16_losses_match_float32_on_the_tiny_model(trained):
    fresh = make_model(seed=0)
    model, images, boxes, labels = trained
    for m in (fresh, model):
        for seed in (0, 1):
            ref = _step_losses(m, images, boxes, labels, None, seed)
            low = _step_losses(m, images, boxes, labels, torch.bfloat16, seed)
            for k in LOSS_KEYS:
                assert abs(low[k] - ref[k]) <= RTOL * ref[k], (k, low[k], ref[k])
    # The trained model's losses are small residuals: the comparison is not of near-constants.
    assert ref["loss_roi_cls"] < 0.2 and ref["loss_rpn_cls"] < 0.1


def test_bf16_losses_match_float32_on_vgg16():
    """VGG16 (random init, fc6/fc7 head) on a 128-px canvas: losses and the head's outputs."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=3, canvas=CanvasConfig(height=128, width=128),
                      anchors=AnchorConfig(scales=(2.0, 4.0, 8.0)),
                      rpn=RPNConfig(pre_nms_top_n_train=600, post_nms_top_n_train=200, min_size=4.0),
                      roi=RoIHeadConfig(dropout=0.0, batch_size_per_image=64))
    model = FasterRCNN(cfg)
    images, boxes, labels = make_images(2)
    ref = _step_losses(model, images, boxes, labels, None)
    low = _step_losses(model, images, boxes, labels, torch.bfloat16)
    for k in LOSS_KEYS:
        assert abs(low[k] - ref[k]) <= RTOL * ref[k], (k, low[k], ref[k])
    model.eval()
    rois = [b.clone() for b in boxes]
    c32, d32 = _head_outputs(model, images, rois, None)
    c16, d16 = _head_outputs(model, images, rois, torch.bfloat16)
    assert c16.dtype == d16.dtype == torch.float32
    assert _rel(c16, c32) <= RTOL and _rel(d16, d32) <= RTOL
    assert _rel(c16, c32) > 0  # the backbone did run in bf16


def test_bf16_detections_match_float32_within_a_pixel(trained):
    model, images, boxes, labels = trained
    model.eval()
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    _assert_detections_close(ref, low, boxes)


def _assert_detections_close(ref, low, boxes) -> None:
    """Every confident (> 0.5) float32 detection has a bf16 one of its label within a pixel and
    RTOL in score, and every object is found."""
    n_confident = 0
    for r, lo in zip(ref, low, strict=True):
        confident = r["scores"] > 0.5
        assert int(confident.sum()) == int((lo["scores"] > 0.5).sum())
        for box, lab, score in zip(r["boxes"][confident], r["labels"][confident], r["scores"][confident], strict=True):
            same = lo["labels"] == lab
            assert bool(same.any())
            err = (lo["boxes"][same] - box).abs().max(dim=1).values
            j = int(err.argmin())
            assert float(err[j]) < 1.0, (box, lo["boxes"][same][j])
            assert abs(float(lo["scores"][same][j]) - float(score)) <= RTOL
            n_confident += 1
    assert n_confident >= sum(b.shape[0] for b in boxes)  # every object found with score > 0.5


def test_detector_runs_under_the_amp_it_is_given(trained):
    """``Detector``'s autocast (bf16 by default on CUDA; asked for here on CPU): the backbone runs
    in bf16, and its detections match float32's as the training step's do."""
    model, images, boxes, labels = trained
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, "PNG")
        pngs.append(buf.getvalue())
    seen = []
    hook = model.backbone[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        ref = Detector(model, amp="off").predict(pngs)
        low = Detector(model, amp="bf16").predict(pngs)
        assert Detector(model).amp is None  # auto: float32 on CPU
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    as_torch = [{"boxes": torch.from_numpy(d.boxes), "scores": torch.from_numpy(d.scores),
                 "labels": torch.from_numpy(d.labels)} for d in (ref, low) for d in d]
    _assert_detections_close(as_torch[:len(ref)], as_torch[len(ref):], boxes)


def test_float16_losses_are_float32_and_close(trained):
    model, images, boxes, labels = trained
    ref = _step_losses(model, images, boxes, labels, None)
    low = _step_losses(model, images, boxes, labels, torch.float16)
    for k in LOSS_KEYS:  # float16 keeps 11 significant bits: its errors are within bfloat16's bound
        assert abs(low[k] - ref[k]) <= RTOL * ref[k], (k, low[k], ref[k])


# ---- make gpu-check, CPU CI size ---------------------------------------------------------------
def test_gpu_check_runs_in_tiny_mode(tmp_path, capsys):
    """benchmarks/gpu_check.py at its CPU size: every path of the GPU acceptance run executes, its
    checks pass and it prints the table (the full size needs CUDA)."""
    from benchmarks import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--tiny", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    # Inference as Detector runs it: float32 on the CPU (bf16 on CUDA)
    for row in ("losses fall, bf16", "losses fall, fp32", "bf16 vs fp32 loss curves", "train images/s, bf16",
                "infer images/s, float32"):
        assert row in table
    assert "| NO " not in table
    import json

    result = json.loads(out.read_text())
    assert [len(result["curves"][k]) for k in ("bf16", "fp32")] == [12, 12]
    assert set(result["speed"]["train_ips"]) == {"ours", "torchvision"}
    assert result["speed"]["infer_dtype"] == {"ours": "torch.float32", "torchvision": "torch.float32"}


def test_gpu_check_multi_gpu_mode_trains_the_recipe_without_downloads(tmp_path):
    """``--gpus N`` trains the recipe's config with random weights (no network on the device
    machines) on the generated dataset's classes."""
    from benchmarks.gpu_check import recipe_file
    from frcnn.config import load_config
    from pipelines.synth import SYNTH_CLASSES

    model, train = load_config(recipe_file(tmp_path))
    recipe, recipe_train = load_config("vgg16_voc")
    assert model.backbone.weights is None and model.class_names == tuple(SYNTH_CLASSES)
    assert (model.canvas, model.backbone.name, model.roi.head, train) == (recipe.canvas, "vgg16", "vgg", recipe_train)
