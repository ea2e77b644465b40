"""Joining a Ray cluster or starting a local one: one rule for every command."""

from __future__ import annotations

import math
import os


def init_ray(address: str | None = None, reserved_cpus: float = 0, log_to_driver: bool = True) -> None:
    """Join the cluster at ``address`` (the commands' ``--address``/``RAY_ADDRESS``), or start a
    local Ray instance. Locally, ``reserved_cpus`` are what long-lived training workers or predictor
    actors take; Ray is started with one more logical CPU than that, so that Ray Data's read,
    decode and write tasks still get a slot beside them (with none left they would wait forever).
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(reserved_cpus) + 1), include_dashboard=False,
             log_to_driver=log_to_driver)
