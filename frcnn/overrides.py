"""``--set key=value`` overrides: dotted config keys, each checked against the config dataclasses
(key and type) when it is parsed, applied to a config file's mapping by ``frcnn.config.load_config``
or to a built ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import yaml

from .config import SECTIONS, ModelConfig, TrainConfig
from .errors import ConfigError
from .typed_config import typed_value


@dataclass(frozen=True)
class Overrides:
    """``--set key=value`` settings: dotted keys under ``model.`` or ``train.``, values read with
    YAML's scalar rules (``0.6``, ``true``, ``null``, ``[0.5, 1.0]``, ``tiny``). Each key and value
    is checked against the config dataclasses when parsed, so a typo or a wrong type is refused
    before any work starts, naming the key.

        ov = Overrides.parse(["model.rpn.nms_thresh=0.6", "train.epochs=3"])
        load_config("tiny", ov)       # the file with both settings applied
        ov.model(cfg)                  # a ModelConfig with model.* applied
    """

    items: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Overrides:
        items: dict[str, Any] = {}
        for text in texts:
            key, sep, raw = str(text).partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. train.epochs=3")
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {key}: {raw!r} is not a YAML scalar or list ({type(exc).__name__})") from None
            hint = _hint_of(key)
            if isinstance(value, (bool, int, float)) and hint in (str, str | None):
                value = raw.strip()  # a word field takes the text as written (amp=off, not False)
            items[key] = typed_value(value, hint, f"--set {key}")
        return cls(tuple(items.items()))

    def __bool__(self) -> bool:
        return bool(self.items)

    def section(self, name: str) -> dict[str, Any]:
        """The settings under ``name.`` (``model`` or ``train``), dotted keys without the prefix."""
        return {k.split(".", 1)[1]: v for k, v in self.items if k.split(".", 1)[0] == name}

    def apply(self, data: Mapping[str, Any], sections: Iterable[str] = SECTIONS) -> dict[str, Any]:
        """A copy of a ``{model: ..., train: ...}`` mapping with the settings of ``sections`` set."""
        out = json.loads(json.dumps(dict(data), default=list))  # a deep copy, tuples as lists
        for name in sections:
            for key, value in self.section(name).items():
                *parents, leaf = [name, *key.split(".")]
                node = out
                for part in parents:
                    if not isinstance(node.get(part), dict):
                        node[part] = {}
                    node = node[part]
                node[leaf] = list(value) if isinstance(value, tuple) else value
        return out

    def model(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with the ``model.*`` settings applied (through the loader's checks)."""
        if not self.section("model"):
            return cfg
        try:
            return ModelConfig.from_dict(self.apply({"model": cfg.to_dict()}, ["model"])["model"])
        except ConfigError as exc:  # a combination the dataclass refuses, named by its section
            raise ConfigError(f"--set: {exc}") from exc

    def train(self, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A ``train:`` section (a dict) with the ``train.*`` settings applied."""
        return self.apply({"train": dict(data or {})}, ["train"])["train"]

    def args(self) -> list[str]:
        """As command-line text: ``["model.rpn.nms_thresh=0.6", ...]``."""
        return [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in self.items]


def config_value(key: str, value: Any) -> Any:
    """``value`` checked (and converted) for the dotted config key ``key``, as ``--set`` does;
    ConfigError naming the key otherwise."""
    return typed_value(value, _hint_of(key), key)


def _hint_of(key: str) -> Any:
    """The declared type of a dotted config key; ConfigError naming the key if there is none."""
    head, _, rest = key.partition(".")
    cls: Any = {"model": ModelConfig, "train": TrainConfig}.get(head)
    if cls is None or not rest:
        raise ConfigError(f"--set {key}: unknown key; keys start with model. or train. (e.g. model.rpn.nms_thresh)")
    where = head
    for part in rest.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            known = sorted(hints) if hints else []
            raise ConfigError(f"--set {key}: unknown key {part!r} in {where}" +
                              (f"; known: {', '.join(known)}" if known else f" ({where} is a value, not a section)"))
        cls, where = hints[part], f"{where}.{part}"
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"--set {key}: a section; set one of its keys ({', '.join(f.name for f in fields(cls))})")
    return cls
