"""The ``frcnn-jobs`` command line: one Click group; each command lives in its own module and
is a thin shell over an importable function (tests call the function, one CLI test the wiring).

Tracking: ``MLFLOW_TRACKING_URI`` (default ``sqlite:///./mlflow.db``). Ray: ``RAY_ADDRESS`` or
``--address`` (default: a local instance). Output: quiet by default, ``-v`` for Ray's detail
(see ``jobs/console.py``). Errors: what a command anticipates (``frcnn.errors.JobError``, file
errors, MLflow's) prints as one ``Error:`` line, exit status 1; the traceback only with ``-v``.
"""

from __future__ import annotations

import importlib

import click

from . import console

# Modules that contribute commands, each exposing COMMANDS: a list of click commands.
_COMMAND_MODULES = ("jobs.data_cmds", "jobs.train", "jobs.sweep", "jobs.evaluate", "jobs.models", "jobs.infer",
                    "jobs.ui", "jobs.demo", "jobs.export")


class _Commands(click.Group):
    """The group; every command's anticipated errors end here as one line (``console``)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # a command's own one-line error
            console.show_traceback(exc)
            raise
        except Exception as exc:
            if console.anticipated(exc):
                raise console.clean_error(exc) from exc
            raise


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="frcnn-jobs")
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, plus Ray's own output: worker logs, Ray Data's execution plans and progress bars.")
def main(verbose: bool) -> None:
    """Faster R-CNN jobs: synth, precompute, train, sweep, evaluate, promote, infer, ui, demo, export."""
    console.configure(verbose)


for _name in _COMMAND_MODULES:
    for _cmd in importlib.import_module(_name).COMMANDS:
        main.add_command(_cmd)
