"""Typed configuration: one frozen dataclass per stage, loadable from YAML.

Defaults are the numbers of the Faster R-CNN walkthrough the detector follows: VGG16 at stride 16, an
800x800 canvas, 9 anchors (ratios 0.5/1/2 x scales 8/16/32), 256 anchors sampled per image,
12000/2000 (train) and 6000/300 (test) proposals, 128 RoIs at most 25 % foreground, 7x7 pooling.

    cfg = ModelConfig.from_yaml("tiny")  # frcnn/configs/tiny.yaml, or any path
    cfg.to_dict()      # flat, resolved values: what MLflow logs as params
    cfg.target_hash()  # what the precomputed shards are keyed on
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from .errors import ConfigError
from .typed_config import build_dataclass, flatten


@dataclass(frozen=True)
class CanvasConfig:
    """Every image is resized (aspect kept) and padded bottom-right onto this canvas (or onto one
    of ``buckets``); ``frcnn.canvas.CanvasTransform.from_config`` applies it."""

    height: int = 800
    width: int = 800
    # ImageNet statistics: torchvision backbones expect them.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # The paper's scale rule (Ren et al. 2015, 3.3; Fast R-CNN's single scale): the short side
    # becomes short_side px unless the long side would then pass max_long_side. 0, 0: no rule,
    # the largest scale that fits the canvas (the walkthrough's). The canvas must hold every image
    # at the rule's size: both sides >= max_long_side, or buckets that cover both orientations.
    short_side: int = 0
    max_long_side: int = 0
    # Aspect-ratio buckets, (height, width) each, multiples of the stride: each image goes on the
    # bucket needing the least padding (at the rule's scale when there is a rule). () = the one
    # canvas height x width. Each bucket has its own anchor grid (ModelConfig.feature_size_for); a
    # training batch holds one bucket.
    buckets: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        # YAML gives lists: frozen equality and hashing need tuples of ints.
        object.__setattr__(self, "buckets", tuple((int(h), int(w)) for h, w in self.buckets))

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The canvases images are put on: the buckets, or the one canvas."""
        return self.buckets or ((self.height, self.width),)


@dataclass(frozen=True)
class AnchorConfig:
    stride: int = 16
    # Scales are multiples of the stride (paper: 8, 16, 32 x 16 = 128, 256, 512 px).
    scales: tuple[float, ...] = (8.0, 16.0, 32.0)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    @property
    def num_anchors(self) -> int:
        return len(self.scales) * len(self.ratios)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "vgg16"  # vgg16 | resnet50 | mobilenet_v3 | tiny
    # "imagenet" downloads torchvision's weights; a path loads a local state dict; None: random init.
    weights: str | None = None
    # Only for the tiny backbone: channel widths of its stride-2 stages.
    tiny_channels: tuple[int, ...] = (16, 32, 64, 128)
    # Stages (from the input) whose weights stay fixed, Detectron's count: VGG16's conv blocks
    # (2 = conv1_1..conv2_2, py-faster-rcnn), ResNet-50's stem then layer1.. (2 = stem + layer1),
    # the stride-2 stages of mobilenet_v3 and tiny. 0: none.
    freeze_at: int = 0
    # What the weights expect: "torchvision" (RGB in 0..1, (x - canvas.mean) / canvas.std) or
    # "caffe" for Caffe-converted VGG16 weights (BGR in 0..255 minus the mean, canvas.mean given
    # in BGR 0..255 units, e.g. py-faster-rcnn's [102.9801, 115.9465, 122.7717], std [1, 1, 1]).
    input_format: str = "torchvision"


@dataclass(frozen=True)
class RPNConfig:
    mid_channels: int = 512
    pos_iou: float = 0.7
    neg_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 12000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    min_size: float = 16.0
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # Paper: L = L_cls / N_cls + lambda * L_reg / N_reg with lambda = 10 and N_reg the number of
    # anchor locations. "positives" divides by the positives (the walkthrough), "sampled" by the
    # sampled anchors (torchvision).
    loc_weight: float = 10.0
    loc_normalizer: str = "locations"  # locations | positives | sampled
    smooth_l1_beta: float = 1.0 / 9.0


@dataclass(frozen=True)
class RoIHeadConfig:
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou_hi: float = 0.5
    bg_iou_lo: float = 0.0
    pool: str = "align"  # align | pool  (torchvision.ops.roi_align / roi_pool)
    pool_size: int = 7
    sampling_ratio: int = 2
    head: str = "auto"  # auto | vgg | light ; auto: VGG's fc6/fc7 for vgg16, light otherwise
    representation_size: int = 4096  # width of the fully connected head
    # Light-Head R-CNN (Li et al. 2017): a 1x1 conv thins the feature map before RoI pooling, so
    # pooling (and its backward, the slowest op on CPU) handles fewer channels. 0 disables.
    reduce_channels: int = 0
    dropout: float = 0.5
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    loc_weight: float = 1.0
    loc_normalizer: str = "sampled"  # sampled | positives
    smooth_l1_beta: float = 1.0 / 9.0
    # Inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    detections_per_img: int = 100


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 20  # foreground classes; the head predicts num_classes + 1
    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()  # the dataset's id of each class (COCO), when it has ids
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIHeadConfig = field(default_factory=RoIHeadConfig)

    @property
    def feature_size(self) -> tuple[int, int]:
        """The feature grid of the one canvas; with buckets there is one grid per bucket
        (``feature_size_for``), and code that assumes a single grid must not get one silently."""
        if self.canvas.buckets:
            raise ValueError(f"canvas.buckets {[list(b) for b in self.canvas.buckets]}: one feature grid per "
                             "bucket; use feature_size_for((height, width))")
        return self.feature_size_for((self.canvas.height, self.canvas.width))

    def feature_size_for(self, canvas_hw: tuple[int, int]) -> tuple[int, int]:
        """The feature grid of one of ``canvas.sizes`` (a bucket, or the one canvas)."""
        hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        if hw not in self.canvas.sizes:
            raise ValueError(f"canvas {hw[0]}x{hw[1]} is not one of the config's canvases "
                             f"{[list(b) for b in self.canvas.sizes]}")
        s = self.anchors.stride
        return hw[0] // s, hw[1] // s

    @property
    def num_anchor_positions(self) -> int:
        h, w = self.feature_size
        return h * w * self.anchors.num_anchors

    def anchor_positions(self) -> dict[tuple[int, int], int]:
        """Anchors per canvas (bucket): ``{(height, width): H*W*A}``."""
        a = self.anchors.num_anchors
        return {hw: self.feature_size_for(hw)[0] * self.feature_size_for(hw)[1] * a for hw in self.canvas.sizes}

    def __post_init__(self) -> None:
        s = self.anchors.stride
        if self.canvas.height % s or self.canvas.width % s:
            raise ConfigError(
                f"canvas {self.canvas.height}x{self.canvas.width} must be a multiple of the stride {s}"
            )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"{len(self.class_names)} class names given for num_classes={self.num_classes}"
            )
        if self.category_ids and len(self.category_ids) != self.num_classes:
            raise ConfigError(f"{len(self.category_ids)} category ids given for num_classes={self.num_classes}")
        _check_canvas(self.canvas, s)
        fmt, mean = self.backbone.input_format, self.canvas.mean
        if fmt not in ("torchvision", "caffe"):
            raise ConfigError(f"backbone.input_format {fmt!r}: torchvision or caffe")
        # The two formats' means differ by 255x: one given for the other is a silent disaster.
        if (fmt == "caffe") != (min(mean) > 1.0):
            units = "BGR 0..255 (e.g. [102.9801, 115.9465, 122.7717])" if fmt == "caffe" else "RGB 0..1"
            raise ConfigError(f"backbone.input_format {fmt} takes canvas.mean in {units}, got {list(mean)}")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self, prefix: str = "model") -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict(), prefix)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return build_dataclass(cls, data, "model")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """The ``model:`` section of a config file (or a bare model mapping); ``path`` may be a
        packaged config name (``tiny``, ``demo``, ``vgg16_voc``). See ``load_config``."""
        model, _ = load_config(path)
        if model is None:
            raise ConfigError(f"{path}: no model: section")
        return model

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def target_fields(self) -> dict[str, Any]:
        """What precomputed anchor targets depend on: shards must match these exactly."""
        return {
            "canvas_height": self.canvas.height,
            "canvas_width": self.canvas.width,
            "stride": self.anchors.stride,
            "anchor_scales": list(self.anchors.scales),
            "anchor_ratios": list(self.anchors.ratios),
            "rpn_pos_iou": self.rpn.pos_iou,
            "rpn_neg_iou": self.rpn.neg_iou,
            "rpn_box_weights": list(self.rpn.box_weights),
            "num_classes": self.num_classes,
            **self._canvas_rule_fields(),
        }

    def _canvas_rule_fields(self) -> dict[str, Any]:
        """The scale rule and buckets, only when set: shards made before they existed keep their hash."""
        c = self.canvas
        out: dict[str, Any] = {}
        if c.short_side or c.max_long_side:
            out.update(canvas_short_side=c.short_side, canvas_max_long_side=c.max_long_side)
        if c.buckets:
            out["canvas_buckets"] = [list(b) for b in c.buckets]
        return out

    def target_hash(self) -> str:
        blob = json.dumps(self.target_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section. The learning rate scales with the effective batch (workers x
    per-worker batch): ``lr = base_lr * scale(effective_batch / lr_reference_batch)`` with scale
    ``linear`` (Goyal et al. 2017: the default), ``sqrt`` or ``none``."""

    epochs: int = 12
    batch_size: int = 2  # per worker
    base_lr: float = 0.02
    lr_reference_batch: int = 16  # base_lr is the rate for this effective batch
    lr_scaling: str = "linear"  # linear | sqrt | none
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    warmup_factor: float = 0.001
    schedule: str = "step"  # step | cosine
    milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of the total steps (step schedule)
    gamma: float = 0.1
    grad_clip_norm: float = 10.0  # 0 disables
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    hflip_prob: float = 0.5
    log_every: int = 10  # steps between MLflow metric writes
    checkpoint_every: int = 1  # epochs between checkpoints
    val_every: int = 1  # epochs between validations (the last epoch always validates)
    keep_checkpoints: int = 2  # best k by the validation metric (latest k without validation)
    max_failures: int = 2  # worker-group restarts before the job fails
    # Validations in a row without a gain in val mAP@0.5 before the run stops (0: never stops early).
    early_stop_patience: int = 0
    seed: int = 0
    prefetch_batches: int = 2
    # DDP's gradient all-reduce: "none" (float32) or "bf16" (torch's bf16_compress_hook: half the
    # bytes on the wire, gradients rounded to bfloat16 before they are averaged).
    grad_compression: str = "none"

    def __post_init__(self) -> None:
        if self.grad_compression not in ("none", "bf16"):
            raise ConfigError(f"train.grad_compression {self.grad_compression!r}: none or bf16")

    def lr_for(self, effective_batch: int) -> float:
        ratio = effective_batch / self.lr_reference_batch
        if self.lr_scaling == "linear":
            return self.base_lr * ratio
        if self.lr_scaling == "sqrt":
            return self.base_lr * math.sqrt(ratio)
        if self.lr_scaling == "none":
            return self.base_lr
        raise ConfigError(f"train.lr_scaling {self.lr_scaling!r}: linear, sqrt or none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return build_dataclass(cls, data, "train")


def _check_canvas(c: CanvasConfig, stride: int) -> None:
    """Refuse a canvas that cannot hold what its rule makes (nothing is shrunk silently)."""
    for h, w in c.sizes:
        if h <= 0 or w <= 0 or h % stride or w % stride:
            what = "canvas.buckets entry" if c.buckets else "canvas"
            raise ConfigError(f"{what} {h}x{w} must be positive multiples of the stride {stride}")
    if c.buckets and (c.height, c.width) not in c.buckets:
        raise ConfigError(f"canvas {c.height}x{c.width} must be one of canvas.buckets {[list(b) for b in c.buckets]}")
    if bool(c.short_side) != bool(c.max_long_side) or c.short_side < 0 or c.max_long_side < c.short_side:
        raise ConfigError(f"canvas.short_side {c.short_side}, max_long_side {c.max_long_side}: both 0 (no rule) "
                         "or 0 < short_side <= max_long_side")
    if c.short_side:
        s, big = c.short_side, c.max_long_side
        landscape = any(h >= s and w >= big for h, w in c.sizes)
        portrait = any(h >= big and w >= s for h, w in c.sizes)
        if not (landscape and portrait):
            missing = " and ".join(n for n, ok in (("landscape", landscape), ("portrait", portrait)) if not ok)
            raise ConfigError(f"canvas sizes {[list(b) for b in c.sizes]} cannot hold every {missing} image at the "
                             f"scale rule's size (short side {s}, long side up to {big}): add a bucket of at least "
                             f"{s}x{big} (landscape, height x width) and {big}x{s} (portrait), or one of {big}x{big}")


# Shipped inside the package (frcnn/configs/<name>.yaml): `--config NAME` works from a wheel.
CONFIG_NAMES = ("tiny", "demo", "vgg16_voc")
SECTIONS = ("model", "train")


class Settings(Protocol):
    """What ``load_config`` applies to a file's mapping: ``frcnn.overrides.Overrides`` (``--set``)."""

    def __bool__(self) -> bool: ...

    def apply(self, data: Mapping[str, Any], sections: Iterable[str] = SECTIONS) -> dict[str, Any]: ...


def config_file(name_or_path: str | Path) -> Path:
    """A packaged config's file (``tiny``, ``demo``, ``vgg16_voc``) or the given path."""
    text = str(name_or_path)
    if text in CONFIG_NAMES:
        from importlib.resources import files

        # A regular package installed from a wheel is a folder on disk: a real path.
        return Path(str(files("frcnn").joinpath("configs", f"{text}.yaml")))
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{text}: no such config file (packaged configs: {', '.join(CONFIG_NAMES)})")
    return path


def load_config(name_or_path: str | Path,
                overrides: Settings | None = None) -> tuple[ModelConfig | None, dict[str, Any]]:
    """The one config loader: a YAML with a ``model:`` and/or a ``train:`` section (or a bare
    model mapping), by packaged name or path, with ``overrides`` (``--set key=value``, a
    ``frcnn.overrides.Overrides``) applied to it before anything is built. Returns the model
    config (None without a ``model:`` section: then ``overrides.model(base)`` changes the caller's
    base) and the ``train:`` section as a dict (validated against ``TrainConfig``; the caller
    applies its shorthand options and builds ``TrainConfig.from_dict``). Anything unusable raises
    ``ConfigError`` naming the file and the key."""
    path = config_file(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with model: and train: sections, "
                          f"got {type(data).__name__}")
    if not data:
        return None, {}
    if not any(k in data for k in SECTIONS):  # a bare model mapping
        data = {"model": data}
    unknown = sorted(str(k) for k in set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; a config holds {' and '.join(SECTIONS)} sections")
    if overrides:
        data = overrides.apply(data, sections=[k for k in SECTIONS if k == "train" or data.get(k) is not None])
    built = {section: build_dataclass(cls, data.get(section) or {}, f"{path}: {section}")
             for section, cls in (("model", ModelConfig), ("train", TrainConfig))}
    model = built["model"] if data.get("model") is not None else None
    return model, dict(data.get("train") or {})


def tiny_config(num_classes: int = 5, class_names: tuple[str, ...] = (), canvas: int = 192) -> ModelConfig:
    """A CPU-sized detector: tiny backbone, small canvas, proposal counts scaled to the canvas."""
    return ModelConfig(
        num_classes=num_classes,
        class_names=class_names,
        canvas=CanvasConfig(height=canvas, width=canvas),
        anchors=AnchorConfig(stride=16, scales=(2.0, 4.0, 8.0), ratios=(0.5, 1.0, 2.0)),
        backbone=BackboneConfig(name="tiny"),
        rpn=RPNConfig(
            mid_channels=128,
            pre_nms_top_n_train=1000,
            post_nms_top_n_train=200,
            pre_nms_top_n_test=600,
            post_nms_top_n_test=100,
            min_size=4.0,
        ),
        roi=RoIHeadConfig(batch_size_per_image=64, representation_size=256, dropout=0.0,
                          reduce_channels=32, sampling_ratio=1),
    )
