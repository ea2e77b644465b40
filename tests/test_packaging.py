"""Configs ship inside the package and load through one loader with clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from frcnn import ModelConfig, tiny_config
from frcnn.config import CONFIG_NAMES, ConfigError, config_file, flatten, load_config
from frcnn.training import TrainConfig

SYNTH_CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


def test_packaged_configs_load_by_name():
    assert set(CONFIG_NAMES) == {"tiny", "demo", "vgg16_voc"}
    tiny, tiny_train = load_config("tiny")
    assert tiny == tiny_config(5, SYNTH_CLASSES) and tiny_train == {}
    demo, demo_train = load_config("demo")
    assert demo == tiny  # the demo is the tiny detector plus a schedule
    assert TrainConfig.from_dict(demo_train).batch_size == 8
    vgg, _ = load_config("vgg16_voc")
    # The VOC recipe (README "The VOC recipe"), not the walkthrough's defaults; checked in test_boxes.
    assert vgg.backbone.name == "vgg16" and vgg.num_classes == 20 and vgg.class_names[0] == "aeroplane"
    assert ModelConfig.from_yaml("vgg16_voc") == vgg
    assert config_file("tiny").parent.name == "configs" and config_file("tiny").parent.parent.name == "frcnn"


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "expected a mapping with model: and train: sections, got list"),
    ("just text\n", "expected a mapping with model: and train: sections, got str"),
    ("model:\n  num_classes: 3\ntrian:\n  epochs: 2\n", "unknown key(s) ['trian']"),
    ("model:\n  num_clases: 3\n", "model: unknown key(s) ['num_clases']"),
    ("model:\n  rpn:\n    nms: 0.5\n", "model.rpn: unknown key(s) ['nms']"),
    ("model:\n  rpn: 0.5\n", "model.rpn: expected a mapping, got float"),
    ("model:\n  num_classes: 3\ntrain:\n  epoch: 2\n", "train: unknown key(s) ['epoch']"),
    ("model:\n  canvas: {height: 100, width: 96}\n", "model: canvas 100x96 must be a multiple of the stride 16"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    with pytest.raises(ValueError, match="bad.yaml"):  # ConfigError is a ValueError: CLIs report it as such
        ModelConfig.from_yaml(path)


def test_missing_config_names_the_packaged_ones(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file .*tiny, demo, vgg16_voc"):
        load_config(tmp_path / "nope.yaml")


def test_sections_and_bare_model_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert load_config(path) == (None, {"epochs": 3})
    path.write_text("num_classes: 3\nanchors:\n  scales: [2, 4]\n")
    model, train = load_config(path)
    assert model.num_classes == 3 and model.anchors.scales == (2, 4) and train == {}
    path.write_text("")
    assert load_config(path) == (None, {})


def test_one_flattener_for_model_and_train_params():
    cfg = tiny_config()
    flat = cfg.flat("model")
    assert flat["model.rpn.nms_thresh"] == cfg.rpn.nms_thresh and flat["model.canvas.height"] == 192
    assert flat == flatten(cfg.to_dict(), "model")
    train = flatten(TrainConfig().to_dict(), "train")
    assert train["train.epochs"] == TrainConfig().epochs
    assert all(k.startswith("train.") and k.count(".") == 1 for k in train)


# ---- the wheel ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package built as a wheel, offline, from a copy of the sources (a build writes build/
    and egg-info beside the sources)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("frcnn", "jobs", "pipelines"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, cwd=src)
    (built,) = out.glob("frcnn_jobs-*.whl")
    return built


def test_wheel_carries_the_configs_and_an_spdx_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        for name in CONFIG_NAMES:
            assert f"frcnn/configs/{name}.yaml" in names
            assert z.read(f"frcnn/configs/{name}.yaml") == (REPO / "frcnn" / "configs" / f"{name}.yaml").read_bytes()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert {"jobs/cli.py", "pipelines/precompute.py", "frcnn/model.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "infra/")) for n in names)


_INSTALLED_CHECK = """
import click, frcnn, jobs.demo
from frcnn.config import load_config
from jobs import options

@click.command()
@options.CONFIG
def probe(config_path):
    print(config_path)

assert frcnn.__file__.startswith(SITE), frcnn.__file__
model, train = load_config(jobs.demo.DEMO_CONFIG)
assert model.backbone.name == "tiny" and train["epochs"] > 0
probe(["--config", "vgg16_voc"])
"""


def test_installed_wheel_resolves_packaged_configs_outside_the_checkout(wheel, tmp_path):
    # A fresh environment holding the wheel, with the project's dependencies reachable through a
    # path entry (not the checkout's editable install), run from a folder outside the checkout.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    site = env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir() and Path(p) != site]
    (site / "_project_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True)
    script = f"SITE = {str(site)!r}\n" + _INSTALLED_CHECK
    run = subprocess.run([str(env_dir / "bin" / "python"), "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr
    resolved = Path(run.stdout.strip().splitlines()[-1])
    assert resolved == site / "frcnn" / "configs" / "vgg16_voc.yaml" and resolved.is_file()
