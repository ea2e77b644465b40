"""``frcnn-jobs synth`` and ``frcnn-jobs precompute``: dataset commands.

    frcnn-jobs synth --out data/synth --images 600 [--format voc|coco|yolo]
    frcnn-jobs precompute --dataset voc --data-root data/synth --split trainval --out data/pre/trainval
    frcnn-jobs precompute --dataset coco --data-root data/coco --split train2017 --out data/pre/train
    frcnn-jobs precompute --dataset coco --annotations ann.json --images imgs/ --split train --out data/pre/train
    frcnn-jobs precompute --dataset yolo --data-root data/yolo/data.yaml --split train --out data/pre/train
    frcnn-jobs precompute --dataset voc --data-root s3://frcnn/raw/VOCdevkit --split trainval \\
        --year 2007,2012 --config vgg16_voc --out s3://frcnn/precomputed/voc0712-trainval

``run_precompute`` is the importable function behind the command: it validates the inputs (no
MLflow run for a command line that cannot work), starts or joins Ray, opens an MLflow run
(``frcnn.job=precompute``), runs ``pipelines.precompute.precompute`` and logs its numbers, its
manifest and its dataset (``mlflow.log_input``: name, source, the manifest's content hash).
Without ``--config`` the model config is ``frcnn/configs/tiny.yaml``'s recipe
(``tiny_config``) sized to the dataset's classes.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from frcnn.config import ModelConfig, tiny_config
from frcnn.errors import ConfigError, StorageError
from frcnn.overrides import Overrides
from pipelines.datasets import FORMATS, DatasetSource
from pipelines.runtime import init_ray
from pipelines.storage import Location

from . import console, options, tracking

if TYPE_CHECKING:
    from pipelines.precompute import PrecomputeOptions


@dataclass
class PrecomputeRun:
    run_id: str
    summary: Any  # pipelines.precompute.PrecomputeSummary


def resolve_config(data_root: str | None, config_path: str | None = None,
                   class_names: Sequence[str] | None = None, overrides: Overrides | None = None, *,
                   dataset_classes: Sequence[str] | None = None) -> ModelConfig:
    """``_resolve_config`` with the ``model.*`` settings of ``--set`` applied."""
    return (overrides or Overrides()).model(_resolve_config(data_root, config_path, class_names, dataset_classes))


def _resolve_config(data_root: str | None, config_path: str | None = None,
                    class_names: Sequence[str] | None = None, dataset_classes: Sequence[str] | None = None
                    ) -> ModelConfig:
    """The model config the targets are computed for.

    ``class_names`` (``--classes``) are the dataset's classes (default: ``dataset_classes``, the
    reader's list, else the VOC data root's ``classes.txt``, else VOC's 20). ``config_path`` (a
    file or a packaged name): its class names are the model's when set (``pipelines.precompute``
    then leaves out the dataset's other classes and refuses a model class the dataset lacks); an
    empty ``class_names`` takes the dataset's. Default: ``tiny_config`` for the dataset's classes.
    """
    def names() -> tuple[str, ...]:
        from pipelines.voc import load_class_names

        return tuple(class_names or dataset_classes or load_class_names(data_root))

    if config_path:
        cfg = ModelConfig.from_yaml(config_path)
        if cfg.class_names:
            return cfg
        if len(names()) != cfg.num_classes:
            raise ConfigError(f"{config_path}: num_classes={cfg.num_classes}, but the dataset has "
                              f"{len(names())} classes {list(names())}; set class_names in the config to train "
                              "on some of them")
        return cfg.replace(class_names=names())
    return tiny_config(num_classes=len(names()), class_names=names())


def run_precompute(data: str | DatasetSource, split: str, out: str, *, config_path: str | None = None,
                   overrides: Overrides | None = None, options: PrecomputeOptions | None = None,
                   experiment: str | None = None, address: str | None = None, tracking_uri: str | None = None,
                   dataset: str = "voc", years: Sequence[str] | None = None,
                   class_names: Sequence[str] | None = None, **option_values: Any) -> PrecomputeRun:
    """Precompute one split, tracked as an MLflow run; returns the run id and the summary.

    ``data``: a :class:`~pipelines.datasets.DatasetSource`, or a data root of format ``dataset``.
    ``options`` (or its fields as keywords): :class:`~pipelines.precompute.PrecomputeOptions`.
    Raises (before any MLflow run exists) on bad input: ``FileExistsError`` for an existing
    ``out`` without ``overwrite``, ``ConfigError`` or ``DatasetError`` (``LayoutError``...) for
    configs, classes or datasets that do not fit. A run that fails (``on_error="fail"``: ``PrecomputeError``
    ``"<file>: <reason>"``) ends FAILED, one interrupted (Ctrl-C) ends KILLED; the error goes on.
    """
    from pipelines import precompute as pc
    from pipelines.datasets import open_split

    opts = options or pc.PrecomputeOptions(**option_values)
    source = data if isinstance(data, DatasetSource) else DatasetSource(dataset, root=str(data))
    source = pc.as_source(source, years, class_names)
    pc.check_output(out, opts.overwrite)
    reader = open_split(source, split)  # a layout error, before any MLflow run
    cfg = resolve_config(source.root, config_path, class_names, overrides, dataset_classes=reader.classes)
    names = pc.model_classes(cfg, reader.classes, source.shown)
    if reader.category_ids:  # kept in the model: detections can go back out with the dataset's ids
        ids = dict(zip(reader.classes, reader.category_ids))
        cfg = cfg.replace(class_names=names, category_ids=tuple(ids[n] for n in names))
    init_ray(address, log_to_driver=console.log_to_driver())
    name = tracking.precompute_run_name(Location.of(source.root or source.annotations).name, split)
    with tracking.job_run("precompute", run_name=name, experiment=experiment, tracking_uri=tracking_uri,
                          tags={"frcnn.data": out, "frcnn.config_hash": cfg.target_hash()},
                          params=_precompute_params(source, split, out, cfg, config_path, opts)) as run:
        if opts.progress:
            print(f"MLflow run {run.info.run_id} ({name})", flush=True)
        summary = pc.precompute(source, split, out, cfg, opts)
        _log_precompute(summary, source, split)
        _log_coverage(summary, f"{Location.of(source.root or source.annotations).name} {split}")
    if opts.progress:
        print(f"MLflow run {run.info.run_id}: {summary.rows} images written to {summary.out}", flush=True)
    return PrecomputeRun(run.info.run_id, summary)


def _precompute_params(source: DatasetSource, split: str, out: str, cfg: ModelConfig, config_path: str | None,
                       opts: PrecomputeOptions, overrides: Overrides | None = None) -> dict[str, Any]:
    return {
        **cfg.flat("model"),
        "precompute.dataset": source.format, "precompute.data_root": source.root,
        "precompute.annotations": source.annotations, "precompute.images": source.images,
        "precompute.split": split, "precompute.out": out,
        "precompute.years": ",".join(source.years) if source.years else "all",
        "precompute.classes": ",".join(source.classes) if source.classes else "dataset",
        "precompute.config": config_path or "tiny (default)",
        "precompute.set": " ".join(overrides.args() if overrides else ()), "precompute.on_error": opts.on_error,
        "precompute.overwrite": opts.overwrite, "precompute.use_difficult": opts.use_difficult,
        "precompute.drop_empty": opts.drop_empty, "precompute.rows_per_shard": opts.rows_per_shard,
        "precompute.jpeg_quality": opts.jpeg_quality, "precompute.config_hash": cfg.target_hash(),
    }


def _log_precompute(summary, source: DatasetSource, split: str) -> None:
    """The run's numbers, its manifest and its dataset (``mlflow.log_input``)."""
    import mlflow

    from pipelines.schema import MANIFEST_NAME

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
    tracking.log_manifest_input(summary.manifest, summary.out, "precompute")


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
              help="Folder to write (the --format layout; voc: VOCdevkit/VOC2007 with classes.txt).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="voc", show_default=True,
              help="Layout: voc (VOCdevkit), coco (annotations/instances_<split>.json + <split>/), "
                   "yolo (data.yaml + images/ + labels/).")
@click.option("--images", type=click.IntRange(1), default=600, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends only on (seed, i).")
@click.option("--min-size", type=click.IntRange(32), default=160, show_default=True, help="Smallest image side.")
@click.option("--max-size", type=click.IntRange(32), default=400, show_default=True, help="Largest image side.")
def synth_cmd(out: str, fmt: str, images: int, seed: int, min_size: int, max_size: int) -> None:
    """Generate the synthetic shapes dataset (five classes, in VOC, COCO or YOLO layout; no download)."""
    from pipelines import synth

    if min_size > max_size:
        raise click.BadParameter(f"--min-size {min_size} > --max-size {max_size}", param_hint="--min-size")
    info = synth.generate(out, n_images=images, seed=seed, min_size=min_size, max_size=max_size, format=fmt)
    click.echo(f"wrote {info['images']} images ({info['objects']} objects, {info['empty_images']} empty) "
               f"to {info['voc_dir']} ({fmt} layout); splits: "
               + ", ".join(f"{k}={v}" for k, v in info["splits"].items()))


@click.command("precompute")
@options.dataset_options
@click.option("--split", default="trainval", show_default=True,
              help="voc: ImageSets/Main/<split>.txt; coco: instances_<split>.json; yolo: the data.yaml key.")
@click.option("--out", required=True, metavar="PATH_OR_URI", help="Output folder (published atomically).")
@options.YEAR
@options.CONFIG
@options.SET
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
def precompute_cmd(dataset, data_root, annotations, images_dir, split, out, years, config_path, overrides,
                   class_names, on_error, overwrite, use_difficult, drop_empty, rows_per_shard, jpeg_quality,
                   experiment, address) -> None:
    """Decode, resize and label anchors once, with Ray Data: Parquet shards + manifest for training."""
    from pipelines.precompute import PrecomputeOptions

    source = options.dataset_source(dataset, data_root, annotations, images_dir, years, class_names)
    opts = PrecomputeOptions(on_error=on_error, overwrite=overwrite, use_difficult=use_difficult,
                             drop_empty=drop_empty, rows_per_shard=rows_per_shard, jpeg_quality=jpeg_quality)
    try:
        run_precompute(source, split, out, config_path=config_path, overrides=overrides, options=opts,
                       experiment=experiment, address=address)
    except OSError as exc:  # storage gone mid-run (an S3 endpoint that stops answering): name the URIs
        if isinstance(exc, (FileExistsError, FileNotFoundError)):  # bad input (or a live lease), named
            raise
        raise StorageError(f"precompute of {source.shown} into {out} failed, nothing published: "
                           f"{console.error_line(exc)}") from exc
    except KeyboardInterrupt:
        click.echo("Interrupted: the MLflow run is marked KILLED and its staging folder deleted. "
                   f"Rerun with: frcnn-jobs {shlex.join(sys.argv[1:])}", err=True)
        sys.exit(console.exit_status())


synth = synth_cmd
precompute = precompute_cmd
COMMANDS = [synth, precompute]
