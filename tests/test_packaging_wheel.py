"""The package as a wheel: what it carries, and an installed wheel resolving its packaged configs
outside the checkout (pip and a fresh virtual environment, in subprocesses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from frcnn.config import CONFIG_NAMES

pytestmark = pytest.mark.integration

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
