"""Real ``frcnn-jobs`` processes for the signal tests: start one in its own session, wait until
it is busy, signal it, collect what it printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def frcnn_jobs(*args: str) -> list[str]:
    """The command line of this environment's ``frcnn-jobs``."""
    return [str(Path(sys.executable).parent / "frcnn-jobs"), *args]


@dataclass(frozen=True)
class Stopped:
    status: int  # the exit status
    out: str
    err: str
    pgid: int  # its process group (the session it led)


def interrupt_when(cmd: Sequence[str], ready: Callable[[], bool], *, cwd: Path, sig: int = signal.SIGINT,
                   group: bool = True, wait_s: float = 300, then_s: float = 180) -> Stopped:
    """Start ``cmd`` in a new session; once ``ready()`` holds, send ``sig`` (to the whole process
    group, as a terminal's Ctrl-C does, or with ``group=False`` to the process alone); return its
    exit status, stdout, stderr and process group. Fails if it ends before it is ready; SIGKILLs what is left."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.5)
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"{cmd[1]} ended (status {proc.returncode}) before it was ready:\n{out}\n{err}")
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=then_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return Stopped(proc.returncode, out, err, proc.pid)


def group_ends(pgid: int, within_s: float = 60) -> bool:
    """Every process of group ``pgid`` is gone within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(1)
    return False


def printed_resume(err: str) -> list[str]:
    """The ``--resume`` command an interrupted ``train`` printed, without the ``--address`` it
    repeats from a ``RAY_ADDRESS`` set in the environment."""
    import re
    import shlex

    cmd = shlex.split(re.search(r"continue with:\n  (.+)", err).group(1))
    if "--address" in cmd:
        del cmd[cmd.index("--address"):cmd.index("--address") + 2]
    return cmd
