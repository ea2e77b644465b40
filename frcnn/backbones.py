"""Backbones (stride 16 feature extractors) and the RoI head that goes with each.

| name          | features                                  | channels | RoI head                    |
| ------------- | ----------------------------------------- | -------- | --------------------------- |
| vgg16         | ``vgg16().features[:30]`` (conv5_3, walkthrough) | 512 | VGG's fc6/fc7, ReLU, dropout |
| resnet50      | conv1 .. layer3 (C4)                       | 1024     | layer4 + average pool       |
| mobilenet_v3  | ``mobilenet_v3_large().features[:13]``      | 112      | light: two FC layers        |
| tiny          | four conv-BN-ReLU stride-2 stages          | 128      | light: two FC layers        |

Weights: ``None`` (random), ``"imagenet"`` (torchvision downloads them: needs the network), or a
path to a local state dict in torchvision's layout, loaded with ``weights_only=True``. Loading is
strict: every key of the layers the detector uses must be in the file with its shape, and every key
in the file must belong to the architecture; keys of layers the detector drops (VGG's fc8,
ResNet's fc) may be present. Anything else is an error naming the file and the keys.

``freeze_at`` counts stages from the input, Detectron's way: VGG16's stages are its five conv
blocks (``freeze_at: 2`` fixes conv1_1..conv2_2, as py-faster-rcnn does), ResNet-50's are the stem
(conv1, bn1, pool) then layer1, layer2, layer3 (``2``: stem + layer1), MobileNetV3's and the tiny
net's are their stride-2 stages. BatchNorm layers in a frozen stage become
``torchvision.ops.FrozenBatchNorm2d``: their statistics stay fixed too.

A new backbone is one function registered with ``@register_backbone(name)``: it returns the
feature extractor, its stages and (optionally) its own RoI head as :class:`BackboneParts`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .config import BackboneConfig, RoIHeadConfig
from .errors import ConfigError, JobError


@dataclass
class Backbone:
    body: nn.Module
    out_channels: int
    stride: int
    head: nn.Module  # pooled (R, C, P, P) -> (R, head_out)
    head_out: int


class WeightsError(JobError, ValueError):
    """A backbone weights file that does not fit the architecture; the message names the file."""


# VGG16's layer names (Simonyan & Zisserman; py-faster-rcnn's prototxt) by torchvision index.
_VGG16_NAMES = {
    "features.0": "conv1_1", "features.2": "conv1_2", "features.5": "conv2_1", "features.7": "conv2_2",
    "features.10": "conv3_1", "features.12": "conv3_2", "features.14": "conv3_3",
    "features.17": "conv4_1", "features.19": "conv4_2", "features.21": "conv4_3",
    "features.24": "conv5_1", "features.26": "conv5_2", "features.28": "conv5_3",
    "classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8",
}


def _key_name(arch: str, key: str) -> str:
    if arch == "vgg16":
        layer = key.rsplit(".", 1)[0]
        if layer in _VGG16_NAMES:
            return f"{key} ({_VGG16_NAMES[layer]})"
    return key


def _some(keys: list[str], arch: str, n: int = 8) -> str:
    shown = ", ".join(_key_name(arch, k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _arch_keys(arch: str) -> set[str]:
    """The state-dict keys of a torchvision architecture, built on the meta device (no memory)."""
    ctor = {"vgg16": torchvision.models.vgg16, "resnet50": torchvision.models.resnet50,
            "mobilenet_v3": torchvision.models.mobilenet_v3_large}[arch]
    with torch.device("meta"):
        return set(ctor(weights=None).state_dict())


def _read_state_dict(weights: str) -> Mapping[str, torch.Tensor]:
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path}: no such file")
    try:
        # mmap: a 528 MB VGG16 file is paged in as it is copied, not read whole first.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - files in the legacy (pre-1.6, non-zip) format cannot be mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"backbone weights {path}: not a PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise WeightsError(f"backbone weights {path}: holds a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), Mapping):
            raise WeightsError(f"backbone weights {path}: a checkpoint with a {wrapper!r} entry, not a bare state "
                               f"dict; save that entry alone (torch.save(ckpt[{wrapper!r}], path))")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"backbone weights {path}: entries that are not tensors: {_some(sorted(map(str, bad)), '')}")
    return state


def load_backbone_weights(model: nn.Module, weights: str | None, arch: str, used: tuple[str, ...],
                          imagenet_enum=None) -> bool:
    """Load ``weights`` into the torchvision ``model`` strictly for the layers the detector uses.

    ``used``: key prefixes of those layers (every key under them must be in the file, with its
    shape). Keys of the architecture's other layers may be present and are dropped; a key that is
    not the architecture's at all is an error. ``num_batches_tracked`` is ignored either way.
    -> whether weights were loaded (``weights`` None: nothing to load).
    """
    if weights is None:
        return False
    if weights == "imagenet":
        if imagenet_enum is None:
            raise WeightsError(f"backbone {arch}: no ImageNet weights; use a local state-dict path")
        # Downloads from torchvision's servers; use a local path where there is no network.
        state = imagenet_enum.get_state_dict(progress=True)
        source = f"imagenet ({imagenet_enum.url})"
    else:
        state = _read_state_dict(weights)
        source = str(weights)
    own = model.state_dict()
    needed = sorted(k for k in own if k.startswith(used) and not k.endswith("num_batches_tracked"))
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    arch_keys = set(own) | _arch_keys(arch)  # the full architecture, also what a frozen-BN copy lacks
    unexpected = sorted(k for k in given if k not in arch_keys)
    missing = [k for k in needed if k not in given]
    if unexpected and len(missing) == len(needed):
        guess = [a for a in ("vgg16", "resnet50", "mobilenet_v3") if a != arch
                 and len(set(given) & _arch_keys(a)) > 0.9 * len(given)]
        like = f"; it looks like a {guess[0]} state dict" if guess else ""
        raise WeightsError(f"backbone weights {source}: not a {arch} state dict: none of its {len(needed)} keys "
                           f"present, {len(unexpected)} unexpected key(s): {_some(unexpected, arch)}{like}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_some(missing, arch)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_some(unexpected, arch)}")
    shapes = [f"{_key_name(arch, k)} {tuple(given[k].shape)} (model {tuple(own[k].shape)})"
              for k in needed if k in given and given[k].shape != own[k].shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {', '.join(shapes[:8])}")
    if problems:
        raise WeightsError(f"backbone weights {source} for {arch}: " + "; ".join(problems))
    model.load_state_dict({k: given[k] for k in needed}, strict=False)
    return True


class LightHead(nn.Module):
    """Two fully connected layers with ReLU: the head for small backbones."""

    def __init__(self, in_features: int, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, width)
        self.fc7 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # He init keeps the activations' scale through each ReLU layer. nn.Linear's default shrinks
        # it about 6x per layer, and the box regressor, fed those near-zero features, learns
        # nothing in the first hundreds of steps.
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.drop(torch.relu(self.fc6(x)))
        return self.drop(torch.relu(self.fc7(x)))


class ResNetC5Head(nn.Module):
    def __init__(self, layer4: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer4 = layer4
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.layer4(x).mean(dim=(2, 3)))


def vgg_head(vgg: nn.Module, dropout: float) -> nn.Sequential:
    """fc6, ReLU, Dropout, fc7, ReLU, Dropout (VGG's classifier without fc8; the walkthrough
    dropped the ReLUs). ``dropout`` replaces VGG's fixed 0.5; 0 puts an Identity in its place, so
    the state-dict keys (head.1 = fc6, head.4 = fc7) do not depend on it."""
    def drop() -> nn.Module:
        return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    return nn.Sequential(nn.Flatten(1), vgg.classifier[0], nn.ReLU(inplace=True), drop(),
                         vgg.classifier[3], nn.ReLU(inplace=True), drop())


def _vgg_init(module: nn.Module) -> None:
    """torchvision's VGG initialisation (``VGG.__init__``), for the layers given memory."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def tiny_body(channels: tuple[int, ...]) -> nn.Sequential:
    """Stride 2 ** len(channels); each stage a stride-2 conv then a stride-1 conv."""
    layers: list[nn.Module] = []
    cin = 3
    for c in channels:
        layers += [_conv_bn(cin, c, 2), _conv_bn(c, c, 1)]
        cin = c
    return nn.Sequential(*layers)


def _frozen_bn(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every BatchNorm2d replaced by FrozenBatchNorm2d (same numbers)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _frozen_bn(child))
    return module


def freeze_stages(body: nn.Sequential, stage_ends: tuple[int, ...], n: int, name: str) -> None:
    """Fix the weights of the first ``n`` stages; stage k ends before child ``stage_ends[k-1]``."""
    if not 0 <= n <= len(stage_ends):
        raise ConfigError(f"backbone.freeze_at {n}: {name} has {len(stage_ends)} stages (0..{len(stage_ends)})")
    if n == 0:
        return
    for i in range(stage_ends[n - 1]):
        body[i] = _frozen_bn(body[i])
        for p in body[i].parameters():
            p.requires_grad_(False)


@dataclass
class BackboneParts:
    """What a registered builder returns: the stride-16 feature extractor, its stages (child
    index after each, for ``freeze_at``) and, when asked for, its own RoI head."""

    body: nn.Sequential
    channels: int
    stride: int
    stage_ends: tuple[int, ...]
    head: tuple[nn.Module, int] | None = None  # (head, its output width); None: the light head


# (config, roi config, own head wanted, load weights) -> parts
Builder = Callable[[BackboneConfig, RoIHeadConfig, bool, bool], BackboneParts]


@dataclass(frozen=True)
class BackboneSpec:
    build: Builder
    own_head: str | None  # the ``roi.head`` name of the architecture's own head; None: light only


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, own_head: str | None = None) -> Callable[[Builder], Builder]:
    """Add a backbone under ``backbone.name``: the one place a new architecture goes. The builder
    loads its weights only when told to (``load_weights``; a checkpoint brings its own)."""
    def add(build: Builder) -> Builder:
        BACKBONES[name] = BackboneSpec(build, own_head)
        return build

    return add


def build_backbone(cfg: BackboneConfig, roi: RoIHeadConfig, stride: int, *, load_weights: bool = True) -> Backbone:
    """The backbone ``cfg.name`` with its RoI head. ``load_weights=False`` builds the same
    architecture (including what ``cfg.weights`` implies, e.g. ResNet's frozen BatchNorm) without
    reading or downloading ``cfg.weights``: for a model whose state dict comes next (a checkpoint,
    or DDP's broadcast from rank 0)."""
    spec = BACKBONES.get(cfg.name)
    if spec is None:
        raise ConfigError(f"unknown backbone {cfg.name!r}: {', '.join(BACKBONES)}")
    if roi.reduce_channels and roi.head in ("vgg", "resnet"):
        raise ConfigError(f"roi.reduce_channels needs the light head, not {roi.head!r}")
    own = spec.own_head is not None and (roi.head == spec.own_head or (roi.head == "auto" and not roi.reduce_channels))
    parts = spec.build(cfg, roi, own, load_weights)
    if parts.stride != stride:
        raise ConfigError(f"backbone {cfg.name} has stride {parts.stride}, the anchor config says {stride}")
    freeze_stages(parts.body, parts.stage_ends, cfg.freeze_at, cfg.name)
    if parts.head is None:
        p = roi.pool_size
        head, head_out = LightHead((roi.reduce_channels or parts.channels) * p * p, roi.representation_size,
                                   roi.dropout), roi.representation_size
    else:
        head, head_out = parts.head
    return Backbone(body=parts.body, out_channels=parts.channels, stride=parts.stride, head=head, head_out=head_out)


@register_backbone("vgg16", own_head="vgg")
def _vgg16(cfg: BackboneConfig, roi: RoIHeadConfig, own_head: bool, load_weights: bool) -> BackboneParts:
    # Built on the meta device, then only the layers used are given memory, and initialised
    # only when no weights are loaded: fc6 alone is 103 M parameters (seconds to initialise,
    # 411 MB), and fc8 or, under the light head, fc6/fc7 are never used.
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    used = [vgg.features] + ([vgg.classifier[0], vgg.classifier[3]] if own_head else [])
    for m in used:
        m.to_empty(device="cpu")
    if not load_backbone_weights(vgg, cfg.weights if load_weights else None, "vgg16",
                                 ("features.",) + (("classifier.0.", "classifier.3.") if own_head else ()),
                                 torchvision.models.VGG16_Weights.IMAGENET1K_V1):
        for m in used:
            _vgg_init(m)
    body = nn.Sequential(*list(vgg.features)[:30])  # conv1_1 .. conv5_3 + ReLU, stride 16
    head = None
    if own_head:
        if roi.pool_size != 7:
            raise ConfigError("the VGG head (fc6 of 25088 inputs) needs roi.pool_size 7")
        head = (vgg_head(vgg, roi.dropout), 4096)
    # Stages end after pool1 .. pool4, then at conv5_3's ReLU.
    return BackboneParts(body, 512, 16, (5, 10, 17, 24, 30), head)


@register_backbone("resnet50", own_head="resnet")
def _resnet50(cfg: BackboneConfig, roi: RoIHeadConfig, own_head: bool, load_weights: bool) -> BackboneParts:
    # Pretrained: BatchNorm frozen throughout (torchvision's and Detectron's detection rule):
    # a few images per GPU give no usable batch statistics.
    rn = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d if cfg.weights else None)
    load_backbone_weights(rn, cfg.weights if load_weights else None, "resnet50",
                          ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.") + (("layer4.",) if own_head else ()),
                          torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    body = nn.Sequential(rn.conv1, rn.bn1, rn.relu, rn.maxpool, rn.layer1, rn.layer2, rn.layer3)
    head = (ResNetC5Head(rn.layer4, roi.dropout), 2048) if own_head else None
    return BackboneParts(body, 1024, 16, (4, 5, 6, 7), head)  # stages: stem, layer1, layer2, layer3


@register_backbone("mobilenet_v3")
def _mobilenet_v3(cfg: BackboneConfig, roi: RoIHeadConfig, own_head: bool, load_weights: bool) -> BackboneParts:
    mb = torchvision.models.mobilenet_v3_large(weights=None)
    load_backbone_weights(mb, cfg.weights if load_weights else None, "mobilenet_v3",
                          tuple(f"features.{i}." for i in range(13)),
                          torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1)
    body = nn.Sequential(*list(mb.features)[:13])  # up to the last stride-16 block
    return BackboneParts(body, 112, 16, (2, 4, 7, 13))  # stages end at strides 2, 4, 8, 16


@register_backbone("tiny")
def _tiny(cfg: BackboneConfig, roi: RoIHeadConfig, own_head: bool, load_weights: bool) -> BackboneParts:
    channels = tuple(cfg.tiny_channels)
    body = tiny_body(channels)
    if cfg.weights == "imagenet":
        raise WeightsError("backbone tiny: no ImageNet weights; use a local state-dict path")
    if cfg.weights and load_weights:
        _load_tiny_weights(body, cfg.weights, channels)
    return BackboneParts(body, channels[-1], 2 ** len(channels), tuple(range(2, 2 * len(channels) + 1, 2)))


def _load_tiny_weights(body: nn.Module, weights: str, channels: tuple[int, ...]) -> None:
    state = _read_state_dict(weights)
    own = set(body.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise WeightsError(f"backbone weights {weights} for tiny{channels}: missing "
                           f"{_some(missing, 'tiny') or 'none'}; unexpected {_some(unexpected, 'tiny') or 'none'}")
    try:
        body.load_state_dict(state)
    except RuntimeError as e:  # shapes: another tiny_channels
        raise WeightsError(f"backbone weights {weights} for tiny{channels}: {e}") from e
