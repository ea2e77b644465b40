"""The in-memory training data path is chosen per node, counting every worker's copy: the VOC
recipe's numbers (608x1008 canvases, VOC07+12 trainval + VOC07 test, about 47.5 GB decoded)."""

from __future__ import annotations

import pytest

from frcnn.config import load_config
from jobs.train_data import NodeRoom, decoded_bytes_per_row, memory_plan

GB = 1e9
VOC0712_TRAINVAL, VOC07_TEST = 16_551, 4_952


@pytest.fixture(scope="module")
def recipe_need() -> float:
    cfg, _ = load_config("vgg16_voc")
    return decoded_bytes_per_row(cfg) * (VOC0712_TRAINVAL + VOC07_TEST)


def test_recipe_decodes_to_about_47_gb(recipe_need):
    assert 47.0 * GB < recipe_need < 48.0 * GB


def test_one_gpu_pods_with_a_large_total_store_stream(recipe_need):
    """Eight one-GPU pods with 256 GB each: the cluster's store (8 x 77 GB) holds the rows four
    times over, but each pod's worker would keep all 47.5 GB itself."""
    pods = [NodeRoom(object_store=77 * GB, memory=179 * GB, cpus=16, gpus=1) for _ in range(8)]
    assert recipe_need < 0.25 * sum(p.object_store for p in pods)  # what a cluster-wide budget sees
    why = memory_plan(recipe_need, pods, workers=8, cpus_per_worker=8, gpus_per_worker=1)
    assert why is not None and "object store (77.0 GB)" in why


def test_an_eight_gpu_node_counts_each_workers_copy(recipe_need):
    node = NodeRoom(object_store=600 * GB, memory=1400 * GB, cpus=96, gpus=8)
    why = memory_plan(recipe_need, [node], workers=8, cpus_per_worker=8, gpus_per_worker=1)
    assert why is not None and why.startswith("8 worker(s) x 47.") and "memory (1400.0 GB)" in why
    # Two workers' copies fit there; so do eight on a node twice the size.
    assert memory_plan(recipe_need, [node], workers=2, cpus_per_worker=8, gpus_per_worker=1) is None
    big = NodeRoom(object_store=600 * GB, memory=2 * 1400 * GB, cpus=96, gpus=8)
    assert memory_plan(recipe_need, [big], workers=8, cpus_per_worker=8, gpus_per_worker=1) is None


def test_workers_per_node_follow_its_resources():
    node = NodeRoom(object_store=10 * GB, memory=40 * GB, cpus=16, gpus=4)
    assert node.workers(8, cpus_per_worker=2, gpus_per_worker=1) == 4  # GPUs bound
    assert node.workers(8, cpus_per_worker=6, gpus_per_worker=0) == 2  # CPUs bound
    assert node.workers(3, cpus_per_worker=1, gpus_per_worker=0) == 3  # the group's size bounds
    head = NodeRoom(object_store=10 * GB, memory=40 * GB, cpus=0)
    # A head with no CPUs hosts no worker and does not decide; the worker node does.
    assert memory_plan(9 * GB, [head, node], workers=2, cpus_per_worker=2, gpus_per_worker=0) is not None
    assert memory_plan(2 * GB, [NodeRoom(1 * GB, 40 * GB, 0), node], workers=2, cpus_per_worker=2,
                       gpus_per_worker=0) is None


def test_small_data_stays_in_memory():
    laptop = NodeRoom(object_store=4 * GB, memory=12 * GB, cpus=2)
    assert memory_plan(0.3 * GB, [laptop], workers=2, cpus_per_worker=1, gpus_per_worker=0) is None
    assert "2 worker(s)" in memory_plan(2 * GB, [NodeRoom(16 * GB, 12 * GB, 2)], workers=2, cpus_per_worker=1,
                                        gpus_per_worker=0)
