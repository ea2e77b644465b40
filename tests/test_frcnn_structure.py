"""The module graph of frcnn/, pipelines/ and jobs/ has no cycle, and a backbone is added in one
place (the registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import frcnn
from frcnn import FasterRCNN, backbones
from frcnn.config import AnchorConfig, BackboneConfig, CanvasConfig, ModelConfig, RoIHeadConfig, RPNConfig

PACKAGE = Path(frcnn.__file__).parent
ROOT = PACKAGE.parent


def _imports(path: Path) -> set[str]:
    """The frcnn modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                out.update(n.split(".")[0] for n in names)
            elif node.module and node.module.startswith("frcnn."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("frcnn."))
    return out


def test_frcnn_has_no_import_cycle():
    graph = {p.stem: _imports(p) & {q.stem for q in PACKAGE.glob("*.py")} for p in PACKAGE.glob("*.py")}
    graph.pop("__init__")
    _assert_acyclic(graph)
    assert "training" not in graph["config"] and "roi_heads" not in graph["rpn"]


def _module_graph() -> dict[str, set[str]]:
    """Every module of frcnn, pipelines and jobs (dotted) -> the modules of those it imports, at
    module level or inside functions, relative imports resolved."""
    mods = {}
    for pkg in ("frcnn", "pipelines", "jobs"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    dep = f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                    if dep in mods and dep != name:
                        deps.add(dep)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods and a.name != name)
        graph[name] = deps
    return graph


def test_no_import_cycle_in_frcnn_pipelines_jobs():
    graph = _module_graph()
    assert {"frcnn.config", "pipelines.synth", "jobs.train"} <= set(graph)
    # A module importing its own package (whose __init__ re-exports it) is no cycle.
    _assert_acyclic({mod: {d for d in deps if d != mod.rpartition(".")[0]} for mod, deps in graph.items()})


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    done, path = set(), []

    def visit(mod: str) -> None:
        if mod in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(mod):] + [mod])}")
        if mod in done:
            return
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            visit(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        visit(mod)


def test_a_registered_backbone_builds_a_detector(monkeypatch):
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))  # the registry, restored after

    @backbones.register_backbone("two_convs")
    def _two_convs(cfg, roi, own_head, load_weights):
        body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 4, 1), nn.ReLU())
        return backbones.BackboneParts(body, 16, 16, (2, 4))

    cfg = ModelConfig(num_classes=2, canvas=CanvasConfig(height=64, width=64),
                      anchors=AnchorConfig(scales=(1.0, 2.0), ratios=(1.0,)), backbone=BackboneConfig(name="two_convs"),
                      rpn=RPNConfig(mid_channels=8, pre_nms_top_n_test=20, post_nms_top_n_test=10, min_size=1.0),
                      roi=RoIHeadConfig(representation_size=8, dropout=0.0))
    model = FasterRCNN(cfg).eval()
    assert model.backbone[2].out_channels == 16
    dets = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert dets[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="unknown backbone 'nope': vgg16, resnet50, mobilenet_v3, tiny, two_convs"):
        FasterRCNN(ModelConfig(backbone=BackboneConfig(name="nope")))
