"""MLflow's system metrics can record GPUs: its NVIDIA monitor needs ``nvidia-ml-py`` (pynvml),
a pinned dependency. On a machine without a GPU the monitor gets as far as asking NVML."""

from __future__ import annotations

import pytest


def test_mlflow_gpu_monitor_finds_pynvml():
    import importlib.metadata

    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    assert importlib.metadata.version("nvidia-ml-py") == "13.615.71"
    try:
        GPUMonitor()
    except RuntimeError as exc:  # pynvml is there; this machine has no NVIDIA driver or GPU
        assert "Failed to initialize NVML" in str(exc)
    except ImportError as exc:
        pytest.fail(f"MLflow cannot record GPUs: {exc}")
