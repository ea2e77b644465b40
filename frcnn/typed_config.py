"""Mapping -> typed frozen dataclass, each value checked against its field's declared type and
every refusal a ``ConfigError`` naming the key (``model.rpn.nms_thresh: expected float, got 'x'``).

Generic: it knows dataclasses and type hints, not which configs exist (``frcnn.config`` builds
its dataclasses with it, ``frcnn.overrides`` checks ``--set`` values with it).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from .errors import ConfigError


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``model.rpn.nms_thresh``): what MLflow logs as params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def build_dataclass(cls: type, data: Mapping[str, Any], where: str):
    """Build a (nested) frozen dataclass from a mapping; unknown keys are an error, not ignored, and
    so is a value the dataclass itself refuses (its ``__post_init__``), named by ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(map(str, unknown))}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = typed_value(value, hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # a value the dataclass refuses (canvas vs stride, ...)
        raise ConfigError(f"{where}: {exc}") from exc


def typed_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the field's type: an int is a float, a list a tuple; anything else that does
    not match (a word for a number, a bool for an int, a scalar for a list) is a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return typed_value(value, option, key)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                pairs = enumerate(zip(value, items, strict=True))
                return tuple(typed_value(v, h, f"{key}[{i}]") for i, (v, h) in pairs)
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every reader of it, as a number.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    quote = " (quote it: YAML reads on/off/yes/no as true/false)" if isinstance(value, bool) and hint is str else ""
    raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}{quote}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "null")
