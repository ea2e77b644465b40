"""The ``frcnn-jobs`` command line: one Click group; each command lives in its own module and
is a thin shell over an importable function (tests call the function, one CLI test the wiring).

Tracking: ``MLFLOW_TRACKING_URI`` (default ``sqlite:///./mlflow.db``). Ray: ``RAY_ADDRESS`` or
``--address`` (default: a local instance).
"""

from __future__ import annotations

import importlib
import logging

import click

# Modules that contribute commands, each exposing COMMANDS: a list of click commands.
_COMMAND_MODULES = ("jobs.data_cmds", "jobs.train", "jobs.evaluate", "jobs.infer", "jobs.demo")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="frcnn-jobs")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Faster R-CNN jobs: synth, precompute, train, evaluate, promote, infer, ui, demo."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # a command module not written yet; any other error is real
        if exc.name != _name:
            raise
        continue
    for _cmd in _mod.COMMANDS:
        main.add_command(_cmd)
