"""``frcnn-jobs ui``: the MLflow UI on the tracking store the jobs write to.

    frcnn-jobs ui --port 5000          # then http://127.0.0.1:5000
"""

from __future__ import annotations

import subprocess
import sys

import click

from . import tracking


def ui_command(port: int = 5000, host: str = "127.0.0.1", tracking_uri: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for the resolved tracking store (run by this interpreter)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    # One worker: the UI is for one user, and MLflow's default of 4 uvicorn workers can die and
    # respawn in a loop on a small, loaded machine.
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def ui_url(port: int = 5000, host: str = "127.0.0.1") -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


@click.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def ui_cmd(port, host):
    """Start the MLflow UI on the tracking store the jobs write to (blocks until stopped)."""
    cmd = ui_command(port, host)
    print(f"MLflow UI at {ui_url(port, host)} (store {cmd[cmd.index('--backend-store-uri') + 1]}); Ctrl-C stops it",
          flush=True)
    try:
        raise SystemExit(subprocess.call(cmd))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


COMMANDS = [ui_cmd]
