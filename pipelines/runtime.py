"""The process side of a job: starting or joining Ray, stopping the Ray it started, bounded I/O
retries for Ray Data, and the priority of the workers a job starts.

Every command starts Ray through :func:`init_ray` and, when interrupted, stops what it started with
:func:`stop_local_ray` before deleting its staging (see ``pipelines.storage``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import warnings

__all__ = [
    "bounded_io_retries",
    "driver_niceness",
    "init_ray",
    "match_priority",
    "release_orphaned_placement_groups",
    "retried_io_patterns",
    "stop_local_ray",
]

log = logging.getLogger(__name__)


# Ray Data retries a file write whose error message matches one of ``DataContext.retried_io_errors``
# up to 10 times with backoff up to 32 s, through a filesystem wrapper that retries each call 10
# more times: an S3 endpoint that stops answering keeps a job busy for many minutes that way.
# Answers that ask to slow down or try again (throttling, 5xx) stay retried by Ray Data; a
# connection that cannot be made is left to the S3 client's own bounded retries (pyarrow's
# standard strategy, 3 attempts), after which the job fails and names the URI.
#
# Ray matches each pattern as a substring and as a regular expression; substring matching is
# going away, so the patterns set here are regular expressions (Ray's literal defaults, escaped).
_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION")


def retried_io_patterns(defaults: list[str] | tuple[str, ...]) -> list[str]:
    """Ray's retried I/O errors as valid regular expressions (literal text escaped), without the
    ones that mean the store cannot be reached."""
    return [re.escape(e) for e in defaults if not _UNREACHABLE.search(e)]


@contextlib.contextmanager
def bounded_io_retries():
    """Within the block, Ray Data gives up on a store it cannot connect to instead of retrying for
    minutes (the datasets and sinks created here keep that setting when they run)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.retried_io_errors
    with warnings.catch_warnings():
        # Ray warns about any non-default value (substring matching is deprecated); these are
        # regular expressions, which is what it asks for.
        warnings.filterwarnings("ignore", message=".*retried_io_errors.*", category=DeprecationWarning)
        ctx.retried_io_errors = retried_io_patterns(saved)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*retried_io_errors.*", category=DeprecationWarning)
            ctx.retried_io_errors = saved


def init_ray(address: str | None = None, reserved_cpus: float = 0, log_to_driver: bool = True) -> None:
    """Join the cluster at ``address`` (the commands' ``--address``/``RAY_ADDRESS``), or start a
    local Ray instance. Locally, ``reserved_cpus`` are what long-lived training workers or predictor
    actors take; Ray is started with one more logical CPU than that, so that Ray Data's read,
    decode and write tasks still get a slot beside them (with none left they would wait forever).
    """
    import ray

    if ray.is_initialized():
        return
    with _kept_sigterm_handler():
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            _start_local(reserved_cpus, log_to_driver)


@contextlib.contextmanager
def _kept_sigterm_handler():
    """``ray.init`` installs its own SIGTERM handlers in the driver (exit at once; a local head's
    kills the daemons and exits 1): a Python handler the caller installed before (a command's stop
    request, see ``jobs.console``) is put back, so SIGTERM stops the job the way Ctrl-C does."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _start_local(reserved_cpus: float, log_to_driver: bool) -> None:
    """A local Ray instance: one more logical CPU than ``reserved_cpus``.

    A terminal's Ctrl-C goes to the whole process group, and the local Ray daemons (GCS, raylet,
    the workers they spawn) are in it: started with SIGINT ignored (inherited across exec) they
    leave the interrupt to the driver, which stops its job and says what to rerun. Dying of it
    first, they would end the driver with exit status 1 before it could.
    """
    import ray

    global _STARTED_HERE
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(reserved_cpus) + 1), include_dashboard=False,
                 log_to_driver=log_to_driver)
        _STARTED_HERE = True
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


_STARTED_HERE = False


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups whose creating actor has died; return how many.

    Ray ends a placement group when both the job and the actor that created it are gone. A Ray
    Train controller that Ray Tune stops with its trial (an ASHA stop) leaves its workers'
    placement group reserved for as long as the sweep's driver lives, and the next trial waits
    for CPUs that never come back. Ray Train's own cleaner for this asks the State API, which a
    local instance started without the dashboard does not serve. Placement groups made by a
    driver (Tune's own) or detached ones are left alone.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = gcs_pb2.PlacementGroupTableData
    live = {table.PENDING, table.PREPARED, table.CREATED, table.RESCHEDULING}
    released = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        creator = ray.ActorID(pg.creator_actor_id) if pg.creator_actor_id else None
        if (pg.state in live and not pg.is_detached and pg.creator_actor_dead and creator is not None
                and not creator.is_nil()):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            released += 1
    return released


def match_priority(niceness: int | None) -> None:
    """Run the calling thread (and the threads it starts) at ``niceness``, the priority of the
    command that started the job. Ray starts its workers at niceness 15 (background work); a
    training worker or a predictor is the job itself, and at 15 every other process on the
    node (the driver, the raylet) takes the CPU first. Raising priority needs the privilege to:
    without it nothing changes."""
    if niceness is None or not hasattr(os, "setpriority"):
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        log.debug("priority left at niceness %s", os.getpriority(os.PRIO_PROCESS, 0))


def driver_niceness() -> int | None:
    """This process's niceness, for :func:`match_priority` in its workers."""
    return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None


def stop_local_ray() -> None:
    """Stop the local Ray instance :func:`init_ray` started in this process (its workers with it).

    An interrupted job calls it before deleting its staging: Ray Data does not wait for the tasks
    it cancels, and a write task still running would recreate the staging folder it writes into.
    A joined cluster is left alone (its tasks end on their own; the next run cleans their staging).
    """
    global _STARTED_HERE
    import ray

    if _STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    _STARTED_HERE = False
