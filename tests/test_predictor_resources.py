"""A predictor's device follows its GPUs (``--gpus-per-actor``): none means CPU, also on a node
where CUDA is available; the four resource options travel as one ``PredictorResources``."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN, tiny_config
from frcnn.config import TrainConfig
from frcnn.training import checkpoint_state
from pipelines.predict import IMAGES_SCHEMA, PREDICTION_SCHEMA, Predictor, PredictorResources


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    torch.manual_seed(0)
    cfg = tiny_config(num_classes=2, canvas=64)
    buf = io.BytesIO()
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), buf)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_cpu_predictor_stays_on_cpu_where_cuda_is_available(monkeypatch, checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resources = PredictorResources(batch_size=2, concurrency=1, cpus_per_actor=1, gpus_per_actor=0)
    predictor = Predictor(checkpoint, resources=resources)
    assert predictor.detector.device == torch.device("cpu")
    assert predictor.detector.amp is None  # float32 on the CPU
    batch = pa.table([pa.array(["a"]), pa.array(["a.png"]), pa.array([_png()], pa.binary()), pa.array([""])],
                     schema=IMAGES_SCHEMA)
    out = predictor(batch)
    assert out.schema == PREDICTION_SCHEMA and out.column("error").to_pylist() == [""]
    assert out.column("height").to_pylist() == [40]


def test_resources_name_the_device_and_ray_options():
    cpu = PredictorResources(cpus_per_actor=2)
    assert (cpu.device, cpu.threads, cpu.ray_options()) == ("cpu", 2, {"num_cpus": 2})
    gpu = PredictorResources(cpus_per_actor=4, gpus_per_actor=0.5)
    assert (gpu.device, gpu.threads, gpu.ray_options()) == ("cuda", None, {"num_cpus": 4, "num_gpus": 0.5})
    with pytest.raises(ValueError, match="batch_size and concurrency >= 1"):
        PredictorResources(batch_size=0)
