"""Options shared by several commands: defined once, reused (as mlflow's CLI does).

    @click.command("evaluate")
    @options.MODEL
    @options.YEAR             # -> years: list[str] | None
    @options.CLASSES          # -> class_names: list[str] | None
    @options.CONFIG           # -> config_path: str | None (a real file; packaged names resolved)
    @options.SET              # -> overrides: frcnn.overrides.Overrides (--set key=value, checked)
    @options.ACTOR_RESOURCES  # -> batch_size, concurrency, gpus_per_actor, cpus_per_actor
    @options.EXPERIMENT
    @options.ADDRESS
    def evaluate_cmd(model_uri, years, class_names, config_path, batch_size, concurrency,
                     gpus_per_actor, cpus_per_actor, experiment, address): ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click

from frcnn.config import CONFIG_NAMES, config_file, load_config
from frcnn.errors import ConfigError
from frcnn.overrides import Overrides
from pipelines.datasets import FORMATS

ADDRESS = click.option(
    "--address", envvar="RAY_ADDRESS", metavar="RAY_ADDRESS", default=None,
    help="Ray cluster to join (also RAY_ADDRESS). Default: start a local Ray instance.")
EXPERIMENT = click.option(
    "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", metavar="NAME", default="frcnn", show_default=True,
    help="MLflow experiment for the run (also MLFLOW_EXPERIMENT_NAME).")
MODEL = click.option(
    "--model", "model_uri", metavar="MODEL", default=None,
    help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id, or a checkpoint path.")


def _config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        path = str(config_file(value))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    load_config(path)  # a file that is not a usable config is refused before any data is read
    return path


CONFIG = click.option(
    "--config", "config_path", metavar="NAME|FILE", callback=_config, default=None,
    help=f"Model config: a packaged one ({'|'.join(CONFIG_NAMES)}) or a YAML file. "
         "Default: the tiny detector sized to the dataset's classes.")


def _overrides(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Overrides:
    try:
        return Overrides.parse(values)
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("--set "), ctx=ctx, param=param) from None


SET = click.option(
    "--set", "overrides", multiple=True, callback=_overrides, metavar="KEY=VALUE",
    help="Change one config setting, e.g. --set model.rpn.nms_thresh=0.6 --set train.epochs=3 (repeatable; "
         "values read as YAML scalars or [lists]; unknown keys and wrong types are refused). Applied on top of "
         "--config.")


def _names(ctx: click.Context, param: click.Parameter, values: tuple[str, ...] | str | None) -> list[str] | None:
    """Comma lists and repeated flags, flattened: ``--x a,b --x c`` -> ``[a, b, c]``."""
    if values is None or values == ():
        return None
    if isinstance(values, str):
        values = (values,)
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("expected a comma-separated list", ctx=ctx, param=param)
    dupes = sorted({v for v in items if items.count(v) > 1})
    if dupes:
        raise click.BadParameter(f"repeated: {', '.join(dupes)}", ctx=ctx, param=param)
    return items


def _years(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str] | None:
    items = _names(ctx, param, values)
    if items is None:
        return None
    bad = [y for y in items if not re.fullmatch(r"(?i:voc)?\d{4}", y)]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: expected years such as 2007,2012", ctx=ctx, param=param)
    years = [y[-4:] for y in items]
    dupes = sorted({y for y in years if years.count(y) > 1})
    if dupes:
        raise click.BadParameter(f"repeated: {', '.join(dupes)}", ctx=ctx, param=param)
    return years


YEAR = click.option(
    "--year", "years", multiple=True, callback=_years, metavar="2007[,2012]",
    help="VOC year(s) to join: a comma list or the flag repeated (--year 2007,2012 = --year 2007 --year 2012). "
         "Default: every year found.")


def _classes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if "," not in value and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        names = [n for n in lines if n and not n.startswith("#")]
        if not names:
            raise click.BadParameter(f"{value}: no class names in the file (one a line)", ctx=ctx, param=param)
        return _names(ctx, param, tuple(names))
    return _names(ctx, param, value)


CLASSES = click.option(
    "--classes", "class_names", callback=_classes, metavar="a,b,c|FILE", default=None,
    help="Class names in label order: a comma list, or a file with one name a line (like classes.txt).")

BATCH_SIZE = click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
                          help="Images per model call.")
CONCURRENCY = click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True,
                           help="Predictors at once (Ray tasks on CPU, actors on a GPU).")
GPUS_PER_ACTOR = click.option("--gpus-per-actor", type=click.FloatRange(0), default=0, show_default=True,
                              help="GPUs per predictor (an actor); 0 runs on CPU.")
CPUS_PER_ACTOR = click.option("--cpus-per-actor", type=click.FloatRange(0.1), default=1, show_default=True,
                              help="CPUs per predictor (also its torch threads on CPU).")


def ACTOR_RESOURCES(fn: Callable) -> Callable:
    """``--batch-size``, ``--concurrency``, ``--gpus-per-actor``, ``--cpus-per-actor``."""
    for option in (CPUS_PER_ACTOR, GPUS_PER_ACTOR, CONCURRENCY, BATCH_SIZE):
        fn = option(fn)
    return fn


DATASET = click.option(
    "--dataset", type=click.Choice(FORMATS), default="voc", show_default=True,
    help="Dataset layout: voc (VOCdevkit), coco (instances JSON + images), yolo (Ultralytics data.yaml).")
DATA_ROOT = click.option(
    "--data-root", default=None, metavar="PATH_OR_URI",
    help="voc: folder holding VOCdevkit/, VOCdevkit/ or one VOC20XX/; coco: folder with "
         "annotations/instances_<split>.json and <split>/; yolo: data.yaml or its folder (local, s3://...).")
ANNOTATIONS = click.option(
    "--annotations", default=None, metavar="FILE", help="coco: the instances JSON (instead of --data-root).")
IMAGES = click.option(
    "--images", "images_dir", default=None, metavar="DIR", help="coco: the images' folder (with --annotations).")


def dataset_options(fn):
    """``--dataset``, ``--data-root``, ``--annotations``, ``--images``, in this order."""
    for option in (IMAGES, ANNOTATIONS, DATA_ROOT, DATASET):
        fn = option(fn)
    return fn


def dataset_source(dataset: str, data_root: str | None, annotations: str | None, images_dir: str | None,
                   years=None, class_names=None):
    """The options as a ``pipelines.datasets.DatasetSource`` (usage errors as ``click.UsageError``)."""
    from pipelines.datasets import DatasetSource

    if not data_root and not annotations:
        alt = " or --annotations FILE --images DIR" if dataset == "coco" else ""
        raise click.UsageError(f"give --data-root{alt}")
    if (annotations or images_dir) and dataset != "coco":
        raise click.UsageError("--annotations and --images are for --dataset coco")
    if annotations and not images_dir and not data_root:
        raise click.UsageError("--annotations FILE needs --images DIR")
    if years and dataset != "voc":
        raise click.UsageError("--year is for --dataset voc")
    return DatasetSource(dataset, root=data_root, annotations=annotations, images=images_dir,
                         years=tuple(years) if years else None, classes=tuple(class_names) if class_names else None)
