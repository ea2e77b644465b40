"""``frcnn-jobs synth`` and ``frcnn-jobs precompute``: dataset commands.

    frcnn-jobs synth --out data/synth --images 600
    frcnn-jobs precompute --dataset voc --data-root data/synth --split trainval --out data/pre/trainval
    frcnn-jobs precompute --dataset voc --data-root s3://frcnn/raw/VOCdevkit --split trainval \\
        --year 2007,2012 --config vgg16_voc --out s3://frcnn/precomputed/voc0712-trainval

``run_precompute`` is the importable function behind the command: it validates the inputs (no
MLflow run for a command line that cannot work), starts or joins Ray, opens an MLflow run
(``frcnn.job=precompute``), runs ``pipelines.precompute.precompute`` and logs its numbers and
manifest. Without ``--config`` the model config is ``frcnn/configs/tiny.yaml``'s recipe
(``tiny_config``) sized to the dataset's classes.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from frcnn.config import ModelConfig, tiny_config
from pipelines.runtime import init_ray

from . import console, options, tracking


@dataclass
class PrecomputeRun:
    run_id: str
    summary: Any  # pipelines.precompute.PrecomputeSummary


def resolve_config(data_root: str, config_path: str | None = None,
                   class_names: Sequence[str] | None = None) -> ModelConfig:
    """The model config the targets are computed for.

    ``class_names`` (``--classes``) are the dataset's classes (default: ``classes.txt`` in the VOC
    year folder, else VOC's 20). ``config_path`` (a file or a packaged name): its class names are
    the model's when set (``pipelines.precompute`` then leaves out the dataset's other classes and
    refuses a model class the dataset lacks); an empty ``class_names`` takes the dataset's.
    Default: ``tiny_config`` for the dataset's classes.
    """
    from pipelines.voc import load_class_names

    if config_path:
        cfg = ModelConfig.from_yaml(config_path)
        if cfg.class_names:
            return cfg
        names = tuple(class_names) if class_names else load_class_names(data_root)
        if len(names) != cfg.num_classes:
            raise ValueError(f"{config_path}: num_classes={cfg.num_classes}, but the dataset has "
                             f"{len(names)} classes {list(names)}; set class_names in the config to train "
                             "on some of them")
        return cfg.replace(class_names=names)
    names = tuple(class_names) if class_names else load_class_names(data_root)
    return tiny_config(num_classes=len(names), class_names=names)


def run_precompute(
    data_root: str,
    split: str,
    out: str,
    *,
    dataset: str = "voc",
    years: Sequence[str] | None = None,
    config_path: str | None = None,
    class_names: Sequence[str] | None = None,
    on_error: str = "skip",
    overwrite: bool = False,
    use_difficult: bool = False,
    drop_empty: bool = False,
    rows_per_shard: int = 256,
    jpeg_quality: int = 95,
    experiment: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> PrecomputeRun:
    """Precompute one split, tracked as an MLflow run; returns the run id and the summary.

    Raises (before any MLflow run exists) on bad input: ``FileExistsError`` for an existing
    ``out`` without ``overwrite``, ``ValueError``/``VocLayoutError`` for configs, classes or
    datasets that do not fit. A run that fails (``on_error="fail"``: ``PrecomputeError``
    ``"<file>: <reason>"``) ends FAILED, one interrupted (Ctrl-C) ends KILLED; the error goes on.
    """
    import mlflow

    from pipelines import precompute as pc
    from pipelines.schema import MANIFEST_NAME
    from pipelines.storage import Location
    from pipelines.voc import load_class_names

    if dataset != "voc":
        raise ValueError(f"unknown dataset {dataset!r}; supported: voc")
    pc.check_output(out, overwrite)
    cfg = resolve_config(data_root, config_path, class_names)
    pc.model_classes(cfg, tuple(class_names) if class_names else load_class_names(data_root), data_root)
    init_ray(address, log_to_driver=console.log_to_driver())

    params = {
        **cfg.flat("model"),
        "precompute.dataset": dataset, "precompute.data_root": data_root, "precompute.split": split,
        "precompute.out": out, "precompute.years": ",".join(years) if years else "all",
        "precompute.classes": ",".join(class_names) if class_names else "dataset",
        "precompute.config": config_path or "tiny (default)", "precompute.on_error": on_error,
        "precompute.overwrite": overwrite, "precompute.use_difficult": use_difficult,
        "precompute.drop_empty": drop_empty, "precompute.rows_per_shard": rows_per_shard,
        "precompute.jpeg_quality": jpeg_quality, "precompute.config_hash": cfg.target_hash(),
    }
    name = tracking.precompute_run_name(Location.of(data_root).name, split)
    with tracking.job_run("precompute", run_name=name, experiment=experiment, tracking_uri=tracking_uri,
                          tags={"frcnn.data": out, "frcnn.config_hash": cfg.target_hash()},
                          params=params) as run:
        run_id = run.info.run_id
        if progress:
            print(f"MLflow run {run_id} ({name})", flush=True)
        summary = pc.precompute(
            data_root, split, out, cfg, years=years, classes=class_names, on_error=on_error,
            overwrite=overwrite, use_difficult=use_difficult, drop_empty=drop_empty,
            rows_per_shard=rows_per_shard, jpeg_quality=jpeg_quality, progress=progress)
        tracking.safe(mlflow.log_metrics, {
            "images_written": summary.rows,
            "images_skipped": len(summary.skipped),
            "warnings": len(summary.warnings),
            "objects_left_out": sum(summary.left_out.values()),
            "positives_per_image": summary.positives_per_image,
            "images_per_s": summary.images_per_s,
            "shards": len(summary.shards),
        })
        tracking.safe(mlflow.log_dict, summary.manifest, MANIFEST_NAME)
        _log_coverage(summary, f"{Location.of(data_root).name} {split}")
    if progress:
        print(f"MLflow run {run_id}: {summary.rows} images written to {summary.out}", flush=True)
    return PrecomputeRun(run_id, summary)


def _log_coverage(summary: Any, title: str) -> None:
    """The anchor-coverage metrics and plot (``anchor_coverage.png``) of a precompute, into the active run."""
    import tempfile

    import mlflow

    from frcnn.anchor_coverage import plot_coverage

    if summary.coverage is None:
        return
    tracking.safe(mlflow.log_metrics, summary.coverage.metrics())
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/anchor_coverage.png"
        plot_coverage(summary.coverage, path, title=f"anchor coverage: {title}")
        tracking.safe(mlflow.log_artifact, path)


# --------------------------------------------------------------------------- command line


@click.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="PATH",
              help="Folder to write (VOCdevkit/VOC2007 layout, with classes.txt).")
@click.option("--images", type=click.IntRange(1), default=600, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends only on (seed, i).")
@click.option("--min-size", type=click.IntRange(32), default=160, show_default=True, help="Smallest image side.")
@click.option("--max-size", type=click.IntRange(32), default=400, show_default=True, help="Largest image side.")
def synth_cmd(out: str, images: int, seed: int, min_size: int, max_size: int) -> None:
    """Generate the synthetic shapes dataset (five classes, VOC layout; no download)."""
    from pipelines import synth

    if min_size > max_size:
        raise click.BadParameter(f"--min-size {min_size} > --max-size {max_size}", param_hint="--min-size")
    info = synth.generate(out, n_images=images, seed=seed, min_size=min_size, max_size=max_size)
    click.echo(f"wrote {info['images']} images ({info['objects']} objects, {info['empty_images']} empty) "
               f"to {info['voc_dir']}; splits: "
               + ", ".join(f"{k}={v}" for k, v in info["splits"].items()))


@click.command("precompute")
@click.option("--dataset", type=click.Choice(["voc"]), default="voc", show_default=True, help="Dataset layout.")
@click.option("--data-root", required=True, metavar="PATH_OR_URI",
              help="Folder holding VOCdevkit/, VOCdevkit/ itself or one VOC20XX/ (local, s3://, gs://...).")
@click.option("--split", default="trainval", show_default=True, help="ImageSets/Main/<split>.txt.")
@click.option("--out", required=True, metavar="PATH_OR_URI", help="Output folder (published atomically).")
@options.YEAR
@options.CONFIG
@options.CLASSES
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: report bad files in the manifest and go on; fail: stop at the first one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (the default refuses).")
@click.option("--use-difficult", is_flag=True, help="Use VOC 'difficult' boxes as anchor targets.")
@click.option("--drop-empty", is_flag=True, help="Drop images with no target box (default: keep as negatives).")
@click.option("--rows-per-shard", type=click.IntRange(1), default=256, show_default=True,
              help="Rows per Parquet shard (at most; smaller on small splits so every CPU works).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality of the stored canvases.")
@options.EXPERIMENT
@options.ADDRESS
def precompute_cmd(dataset, data_root, split, out, years, config_path, class_names, on_error, overwrite,
                   use_difficult, drop_empty, rows_per_shard, jpeg_quality, experiment, address) -> None:
    """Decode, resize and label anchors once, with Ray Data: Parquet shards + manifest for training."""
    from pipelines.precompute import PrecomputeError
    from pipelines.voc import VocLayoutError

    try:
        run_precompute(data_root, split, out, dataset=dataset, years=years, config_path=config_path,
                       class_names=class_names, on_error=on_error, overwrite=overwrite,
                       use_difficult=use_difficult, drop_empty=drop_empty, rows_per_shard=rows_per_shard,
                       jpeg_quality=jpeg_quality, experiment=experiment, address=address)
    except (PrecomputeError, FileExistsError, FileNotFoundError, VocLayoutError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # storage gone mid-run (an S3 endpoint that stops answering): name the URIs
        raise click.ClickException(f"precompute of {data_root} into {out} failed, nothing published: {exc}") from exc
    except KeyboardInterrupt:
        click.echo("Interrupted: the MLflow run is marked KILLED and its staging folder deleted. "
                   f"Rerun with: frcnn-jobs {shlex.join(sys.argv[1:])}", err=True)
        sys.exit(console.exit_status())


synth = synth_cmd
precompute = precompute_cmd
COMMANDS = [synth, precompute]
