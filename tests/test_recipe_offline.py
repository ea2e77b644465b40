"""A VGG16-recipe checkpoint works without fetching backbone weights: any download raises, the
"ImageNet" weights are staged in torch's cache for rank 0 only, and then training (rank 0 and a
second rank), resuming, evaluate/infer's Detector and the registered pyfunc (in a fresh process,
as ``mlflow models serve`` loads it) all run from the checkpoint alone. Then two real gloo ranks:
rank 1 never reads the weights file and ends up with rank 0's parameters and frozen BatchNorm
statistics through DDP's broadcast (``frcnn.training.DDP_OPTIONS``)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.hub
import torchvision
from PIL import Image

from frcnn import backbones
from frcnn.config import BackboneConfig, CanvasConfig, ModelConfig, TrainConfig, load_config, tiny_config
from frcnn.inference import Detector
from frcnn.model import total_loss
from frcnn.training import (
    DDP_OPTIONS,
    build_optimizer,
    checkpoint_state,
    load_checkpoint,
    training_model,
)

pytestmark = pytest.mark.integration  # a subprocess loads the pyfunc; two gloo ranks

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's cache name for VGG16_Weights.IMAGENET1K_V1

NO_DOWNLOAD = """
import torch.hub, urllib.request
def _refuse(*args, **kwargs):
    raise RuntimeError(f"download attempted: {args[:1]}")
torch.hub.download_url_to_file = _refuse
urllib.request.urlopen = _refuse
"""


def _refuse(*args, **kwargs):
    raise RuntimeError(f"download attempted: {args[:1]}")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any weight download raises; torch's cache is an empty folder of this test."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(urllib.request, "urlopen", _refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def recipe_config() -> ModelConfig:
    """vgg16_voc as shipped (``backbone.weights: imagenet``, VGG head, freeze_at 2), on small canvases
    with anchors that fit them."""
    cfg, _ = load_config("vgg16_voc")
    assert cfg.backbone.weights == "imagenet" and cfg.roi.head == "vgg"
    canvas = CanvasConfig(height=96, width=160, buckets=((96, 160), (160, 96), (96, 96)), short_side=80,
                          max_long_side=144)
    return dataclasses.replace(cfg, canvas=canvas, anchors=dataclasses.replace(cfg.anchors, scales=(2.0, 4.0)))


def _fake_imagenet_vgg16() -> dict[str, torch.Tensor]:
    """A full VGG16 state dict in torchvision's layout with recognisable (seeded) values."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _two_steps(model, tcfg: TrainConfig) -> None:
    images = torch.randint(0, 255, (1, 3, 96, 160), dtype=torch.uint8)
    targets = {"boxes": [torch.tensor([[10.0, 12.0, 90.0, 80.0]])], "labels": [torch.tensor([3])]}
    opt = build_optimizer(model, tcfg, 0.001)
    model.train()
    for _ in range(2):
        loss = total_loss(model(images, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_vgg16_recipe_checkpoint_never_downloads(offline, tmp_path):
    cfg = recipe_config()
    _, train = load_config("vgg16_voc")
    tcfg = TrainConfig.from_dict(train)
    with pytest.raises(RuntimeError, match="download attempted"):  # the guard holds
        torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict()
    # Rank 1 of a fresh start reads nothing (nothing is staged yet: a read would download).
    rank1 = training_model(cfg, None, rank=1)
    # Rank 0 reads the staged file once.
    offline.mkdir(parents=True, exist_ok=True)
    imagenet = _fake_imagenet_vgg16()
    torch.save(imagenet, offline / VGG16_FILE)
    torch.manual_seed(0)
    model = training_model(cfg, None, rank=0)
    assert torch.equal(model.backbone[28].weight, imagenet["features.28.weight"])
    assert torch.equal(model.roi_heads.head[1].weight, imagenet["classifier.0.weight"])  # fc6
    assert not torch.equal(rank1.backbone[28].weight, imagenet["features.28.weight"])
    del rank1
    _two_steps(model, tcfg)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(checkpoint_state(model, None, 0, 2, cfg, tcfg), ckpt)  # no optimizer state: half the bytes
    (offline / VGG16_FILE).unlink()  # from here on, reading "imagenet" would download
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    del model

    state = load_checkpoint(ckpt)
    assert state["model_config"]["backbone"]["weights"] == "imagenet"
    for rank in (0, 1):  # --resume / a restarted group
        resumed = training_model(cfg, state, rank=rank)
        assert all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())
        del resumed
    del state
    detector = Detector.from_checkpoint(str(ckpt), "cpu")  # evaluate's and infer's predictor
    assert detector.model.cfg.backbone.weights == "imagenet"  # the config is kept as trained
    dets = detector.predict([_png(150, 90, 1), b"not an image"])
    assert dets[0].error is None and dets[0].boxes.shape[1] == 4 and dets[1].error
    del detector
    _serve_pyfunc_in_fresh_process(ckpt, tmp_path)


def _serve_pyfunc_in_fresh_process(ckpt, tmp_path) -> None:
    """What ``mlflow models serve`` does with the registered model: load the pyfunc (code + the
    checkpoint) in a new process, then predict; downloads raise there too."""
    import mlflow.pyfunc

    from jobs.models import PYFUNC_CODE

    model_dir = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(model_dir), python_model=PYFUNC_CODE, artifacts={"checkpoint": str(ckpt)})
    (tmp_path / "image.png").write_bytes(_png(120, 100, 2))
    script = NO_DOWNLOAD + textwrap.dedent(f"""
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({str(model_dir)!r})
        out = model.predict(pd.DataFrame({{"image": [open({str(tmp_path / "image.png")!r}, "rb").read()]}}))
        assert out["error"][0] is None, out
        print("served", len(out))
    """)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "served 1" in done.stdout, done.stderr[-3000:]


# ---- rank 0 reads, DDP broadcasts -----------------------------------------------------------------
def _rank(rank: int, init: str, cfg: ModelConfig, out: str) -> None:
    if rank == 1:  # this rank must not touch the weights file
        def refuse(path):
            raise RuntimeError(f"rank 1 read {path}")

        backbones._read_state_dict = refuse
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different initial weights on each rank
        model = training_model(cfg, None, rank)
        ddp = torch.nn.parallel.DistributedDataParallel(model, **DDP_OPTIONS)
        torch.save({k: v.detach().clone() for k, v in ddp.module.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_rank_zero_reads_the_weights_and_ddp_broadcasts_them(tmp_path):
    weights = tmp_path / "tiny.pth"
    torch.manual_seed(3)
    src = backbones.tiny_body((16, 32, 64, 128))
    for m in src.modules():  # non-trivial BatchNorm statistics, frozen below (freeze_at: 2)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save(src.state_dict(), weights)
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, backbone=BackboneConfig(name="tiny", weights=str(weights), freeze_at=2))
    out = str(tmp_path / "state")
    torch.multiprocessing.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", cfg, out), nprocs=2)
    s0, s1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0), [k for k in s0 if not torch.equal(s0[k], s1[k])]
    # rank 0 holds the file's weights, frozen statistics included: so does rank 1 now
    assert torch.equal(s1["backbone.0.1.running_mean"], src.state_dict()["0.1.running_mean"])
    assert torch.equal(s1["backbone.2.0.weight"], src.state_dict()["2.0.weight"])
