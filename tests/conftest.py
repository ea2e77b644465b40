import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray.

    Four logical CPUs on a 2-core machine: two training workers take one each, and Ray Data's
    read/decode tasks still need slots beside them (with only 2, they would wait forever).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
