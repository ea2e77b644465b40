import os
import signal

import pytest

# A shell that runs the suite in the background (`make test &`, `nohup ... &`) starts it with SIGINT
# ignored, and an ignored signal stays ignored across fork and exec: the Ctrl-C tests' subprocesses
# would never see the interrupt they are sent (and would run to the end, exit status 0). With a
# handler here, the children start with SIGINT at its default, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
