"""infra/ pins GPU machines to an NVIDIA driver the CUDA 13 torch wheels run on (580 or newer):
the Ray cluster launcher's GPU workers boot the DLAMI with such a driver and refuse an older one;
the KubeRay GPU group schedules only onto nodes whose driver major is above 579."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _gpu_node_type() -> tuple[dict, dict]:
    config = yaml.safe_load((INFRA / "ray-cluster" / "aws.yaml").read_text())
    (gpu,) = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    return config, gpu


def test_launcher_gpu_workers_boot_a_driver_580_image():
    _, gpu = _gpu_node_type()
    assert gpu["node_config"]["ImageId"] == (
        "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id")


@pytest.mark.parametrize("driver,ok", [("575.57.08", False), ("580.105.08", True), ("595.91.07", True)])
def test_launcher_gpu_workers_refuse_an_older_driver(tmp_path, driver, ok):
    config, _ = _gpu_node_type()
    (check,) = config["worker_setup_commands"]
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho {driver}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(["bash", "-c", check], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode == 0) is ok, done
    assert ok or f"NVIDIA driver {driver} < 580" in done.stdout


def test_kuberay_gpu_group_requires_driver_above_579():
    (rc,) = [d for d in yaml.safe_load_all((INFRA / "k8s" / "kuberay" / "raycluster.yaml").read_text())
             if d and d.get("kind") == "RayCluster"]
    groups = {g["groupName"]: g["template"]["spec"] for g in rc["spec"]["workerGroupSpecs"]}
    terms = groups["gpu"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/cuda.driver-version.major", "operator": "Gt",
                                            "values": ["579"]}]}]
    assert all("affinity" not in spec for name, spec in groups.items() if name != "gpu")
