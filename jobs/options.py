"""Options shared by several commands: defined once, reused (as mlflow's CLI does)."""

from __future__ import annotations

import click

ADDRESS = click.option(
    "--address", envvar="RAY_ADDRESS", metavar="RAY_ADDRESS", default=None,
    help="Ray cluster to join (also RAY_ADDRESS). Default: start a local Ray instance.")
EXPERIMENT = click.option(
    "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", metavar="NAME", default="frcnn", show_default=True,
    help="MLflow experiment for the run (also MLFLOW_EXPERIMENT_NAME).")
CONFIG = click.option(
    "--config", "config_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False), default=None,
    help="Model config YAML (see configs/). Default: configs/tiny.yaml's values for the generated dataset.")
MODEL = click.option(
    "--model", "model_uri", metavar="MODEL", default=None,
    help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id, or a checkpoint path.")
