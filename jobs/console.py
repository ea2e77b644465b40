"""What a command prints: quiet by default, the detail with ``frcnn-jobs -v``. The one switch.

``jobs.cli.main`` calls ``configure(verbose)`` once. A job then:

- starts or joins Ray with ``log_to_driver=console.log_to_driver()`` (the workers' and actors'
  own output, e.g. Ray Train's repeated "PlacementGroupCleaner" warnings, stays in Ray's log
  files unless ``-v``),
- calls ``console.quiet_ray()`` after Ray is up: Ray Data's per-operator execution log and its
  progress bars are off in a non-interactive run (printed as hundreds of log lines there), on in
  a terminal or with ``-v``,
- prints its own progress lines with ``print(..., flush=True)`` or ``click.echo`` as today: those
  always show.

``verbose()`` is False when no command line configured it (the functions called from tests
stay quiet unless the root logger is at DEBUG).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

_verbose: bool | None = None
# Loggers whose INFO stream (execution plans, per-operator progress, controller chatter) is detail.
_RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.util")
# Single INFO/WARNING lines that only restate what quiet mode did or what the job prints itself:
# "Started a local Ray instance.", "Progress bars disabled. To enable, set ...", boto3's "Found
# credentials in environment variables." (the S3 leases, pipelines/lease.py).
_RAY_CHATTER = {"ray._private.worker": logging.WARNING, "ray.data._internal.progress": logging.ERROR,
                "botocore.credentials": logging.WARNING}


def configure(verbose: bool = False) -> None:
    """Set the switch and the logging levels: DEBUG with ``verbose``, else INFO for our own
    messages and WARNING for Ray's libraries. Warnings are shown once (Python's default)."""
    global _verbose
    _verbose = bool(verbose)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray folds repeated worker lines into one "[repeated Nx across cluster]" (its default; set
    # here so an environment that turned it off gets it back in quiet mode).
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # Defaults for what a job starts later, also where it forgets quiet_ray()/log_to_driver():
        # Ray reads RAY_LOG_TO_DRIVER when ray.init gets no log_to_driver, Ray Data this one when
        # it creates the DataContext. A user's own setting wins.
        os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")
        if not interactive():
            os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
            # MLflow's own bar ("Downloading artifacts: 100%|...") is a line per update in a log.
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _set_ray_levels(quiet=not verbose)
    install_stop_signals()


def verbose() -> bool:
    """``-v`` was given (or, without a command line, the root logger is at DEBUG)."""
    if _verbose is not None:
        return _verbose
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def interactive() -> bool:
    """stdout is a terminal: progress bars redraw in place there instead of piling up as lines."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout (pytest capture, pipes)
        return False


def log_to_driver() -> bool:
    """What to pass as ``ray.init(log_to_driver=...)``: the workers' output only with ``-v``."""
    return verbose()


def quiet_ray() -> None:
    """Ray Data's progress bars only in a terminal or with ``-v``; its execution-plan log and
    per-dataset stats only with ``-v``. Call on the driver after Ray is started (it sets the
    driver's ``DataContext``, which the executions started from this process use)."""
    from ray.data import DataContext

    detail = verbose()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = detail or interactive()
    ctx.print_on_execution_start = detail
    ctx.enable_auto_log_stats = detail
    _set_ray_levels(quiet=not detail)


def _set_ray_levels(quiet: bool) -> None:
    """Quiet: Ray's libraries at WARNING, the chatter above; else every level inherited again."""
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    for name, level in _RAY_CHATTER.items():
        logging.getLogger(name).setLevel(level if quiet else logging.NOTSET)


# ---- errors: one line, the traceback only with -v ------------------------------------------------

# Errors a command anticipates besides ``frcnn.errors.JobError``: the standard file errors name
# their path. MLflow's (a tracking store that refuses) are recognised by name, so that this module
# does not import MLflow.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
_MLFLOW_ERRORS = ("MlflowException",)


def anticipated(exc: BaseException) -> bool:
    """``exc`` is bad input or an unusable resource (a one-line error), not a bug (a traceback)."""
    from frcnn.errors import JobError

    exc = _unwrap(exc)
    return isinstance(exc, (JobError, *_FILE_ERRORS)) or any(
        cls.__name__ in _MLFLOW_ERRORS and cls.__module__.startswith("mlflow") for cls in type(exc).__mro__)


def error_line(exc: BaseException) -> str:
    """The message a user sees: the error's own text (MLflow's ``message``), on one line."""
    exc = _unwrap(exc)
    text = str(getattr(exc, "message", None) or exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def clean_error(exc: BaseException):
    """A ``click.ClickException`` for ``exc`` (``Error: <one line>``, exit status 1); with ``-v``
    the traceback is printed to stderr first."""
    import click

    show_traceback(exc)
    return click.ClickException(error_line(exc))


def show_traceback(exc: BaseException) -> None:
    """With ``-v``: the traceback of ``exc``, or of its cause for a ClickException made from one
    (a ClickException of its own has no traceback worth showing)."""
    import traceback

    if not verbose():
        return
    if _is_click_error(exc):
        if exc.__cause__ is None:
            return
        exc = exc.__cause__
    traceback.print_exception(exc, file=sys.stderr)


def _is_click_error(exc: BaseException) -> bool:
    import click

    return isinstance(exc, click.ClickException)


def _unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised, out of Ray's wrapper (whose text carries the remote traceback)."""
    while type(exc).__name__.startswith("RayTaskError") and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


# --------------------------------------------------------------------------- stop signals
#
# Schedulers stop a job with SIGTERM (Kubernetes, systemd, ``timeout``, cron wrappers): it is a stop
# request like Ctrl-C. The handler raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main
# thread, so every command's Ctrl-C path runs: workers stopped, staging deleted, the MLflow run
# KILLED, the rerun or resume command printed; the command then exits with :func:`exit_status`
# (143 for SIGTERM, 130 for Ctrl-C). A second SIGTERM, or the grace period
# (``FRCNN_STOP_GRACE_S``, default 60 s) running out, ends the process at once; what it leaves
# is cleaned up by the next run through its lease (``pipelines/lease.py``).

STOP_GRACE_ENV = "FRCNN_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 60.0
_stop_signal: int | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as on Ctrl-C."""


def install_stop_signals() -> None:
    """Make SIGTERM a stop request (from the main thread; elsewhere nothing changes). Ray's start
    keeps a handler installed here (``pipelines.runtime.init_ray``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def stop_grace() -> float:
    raw = os.environ.get(STOP_GRACE_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_STOP_GRACE_S
    except ValueError:
        return DEFAULT_STOP_GRACE_S


def _on_sigterm(signum, frame) -> None:
    global _stop_signal
    if _stop_signal is not None:
        _hard_exit("second SIGTERM")
    _stop_signal = signum
    grace = stop_grace()
    timer = threading.Timer(grace, _hard_exit, args=(f"still stopping {grace:g} s after SIGTERM",))
    timer.daemon = True
    timer.start()
    print("\nSIGTERM: stopping (a second SIGTERM ends at once)", file=sys.stderr, flush=True)
    raise Terminated()


def _hard_exit(why: str) -> None:
    print(f"\n{why}: ending now; the next run cleans up what is left", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


def stop_requested() -> bool:
    """A stop signal (SIGTERM) arrived in this process."""
    return _stop_signal is not None


def exit_status() -> int:
    """The exit status of a stopped command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + _stop_signal if _stop_signal is not None else 130
