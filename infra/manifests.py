"""infra/'s files and the Kubernetes objects in them, parsed (for tests/test_infra*.py)."""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def infra_files() -> list[Path]:
    """The deployment files: everything in infra/ but the rehearsal's and this package's Python."""
    return sorted(p for p in INFRA.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py")


def yaml_files() -> list[Path]:
    return [p for p in infra_files() if p.suffix in (".yaml", ".yml")]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@functools.cache
def load_docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in infra/ (anything with apiVersion + kind)."""
    out = []
    for path in yaml_files():
        for doc in load_docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, doc))
    return out


def docs_of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def walk(node):
    """Yield every mapping nested anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def pod_containers(doc: dict) -> list[dict]:
    """All containers (and init containers) of all pod specs inside a document."""
    out = []
    for m in walk(doc):
        for key in ("containers", "initContainers"):
            if isinstance(m.get(key), list):
                out.extend(c for c in m[key] if isinstance(c, dict))
    return out
