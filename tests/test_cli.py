"""The shared Click options (jobs/options.py): one --year form for every command, --classes from
a list or a file, --config by packaged name or path, the actor resources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from jobs import console, options


@click.command()
@options.YEAR
@options.CLASSES
@options.CONFIG
@options.ACTOR_RESOURCES
def _probe(years, class_names, config_path, batch_size, concurrency, gpus_per_actor, cpus_per_actor):
    click.echo(json.dumps({"years": years, "classes": class_names, "config": config_path, "batch_size": batch_size,
                           "concurrency": concurrency, "gpus": gpus_per_actor, "cpus": cpus_per_actor}))


def _parse(*args: str) -> dict:
    result = CliRunner().invoke(_probe, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _refused(*args: str) -> str:
    result = CliRunner().invoke(_probe, list(args))
    assert result.exit_code == 2, result.output  # a usage error, not a traceback
    return result.output


@pytest.mark.parametrize("args", [
    ["--year", "2007,2012"],
    ["--year", "2007", "--year", "2012"],
    ["--year", "VOC2007, 2012"],
    ["--year", "voc2007,", "--year", "2012"],
])
def test_year_takes_a_comma_list_or_the_flag_repeated(args):
    assert _parse(*args)["years"] == ["2007", "2012"]


def test_year_defaults_to_none_and_refuses_bad_or_repeated_years():
    assert _parse()["years"] is None
    assert "20x7: expected years such as 2007,2012" in _refused("--year", "20x7")
    assert "repeated: 2007" in _refused("--year", "2007", "--year", "VOC2007")


def test_classes_from_a_list_or_a_file(tmp_path):
    assert _parse("--classes", "ball, box")["classes"] == ["ball", "box"]
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\nball\n\nbox\ncup\n")
    assert _parse("--classes", str(names))["classes"] == ["ball", "box", "cup"]
    assert "repeated: ball" in _refused("--classes", "ball,box,ball")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert "no class names in the file" in _refused("--classes", str(tmp_path / "empty.txt"))


def test_config_by_packaged_name_or_path(tmp_path):
    packaged = Path(_parse("--config", "vgg16_voc")["config"])
    assert packaged.name == "vgg16_voc.yaml" and packaged.is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("model:\n  num_classes: 3\n")
    assert _parse("--config", str(own))["config"] == str(own)
    out = _refused("--config", "vgg16")
    assert "vgg16: no such config file" in out and "tiny, demo, vgg16_voc" in out


def test_actor_resources_defaults_and_values():
    assert _parse() | {"years": None} == {"years": None, "classes": None, "config": None, "batch_size": 8,
                                           "concurrency": 1, "gpus": 0, "cpus": 1}
    got = _parse("--batch-size", "16", "--concurrency", "2", "--gpus-per-actor", "0.5", "--cpus-per-actor", "3")
    assert (got["batch_size"], got["concurrency"], got["gpus"], got["cpus"]) == (16, 2, 0.5, 3)
    assert "--batch-size" in _refused("--batch-size", "0")


@pytest.fixture
def restore_console(monkeypatch):
    import logging

    for name in ("RAY_LOG_TO_DRIVER", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DEDUP_LOGS",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)  # and restored after the test
    levels = {n: logging.getLogger(n).level for n in ("", *console._RAY_LOGGERS, *console._RAY_CHATTER)}
    saved = console._verbose
    yield
    console._verbose = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_by_default_detail_with_verbose(restore_console):
    import logging

    from ray.data import DataContext

    from jobs.cli import main

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats)
    try:
        # The group callback sets the switch; `--help` of a command runs it without running Ray.
        assert CliRunner().invoke(main, ["synth", "--help"]).exit_code == 0
        assert console.verbose() is False and console.log_to_driver() is False
        # What a job starts later inherits the quiet defaults even without calling quiet_ray().
        assert os.environ["RAY_LOG_TO_DRIVER"] == "0" and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        console.quiet_ray()
        assert (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats) == (
            False, False, False)  # CliRunner's stdout is not a terminal
        assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("ray.train").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("ray.data._internal.progress").getEffectiveLevel() == logging.ERROR

        assert CliRunner().invoke(main, ["-v", "synth", "--help"]).exit_code == 0
        assert console.verbose() is True and console.log_to_driver() is True
        console.quiet_ray()
        assert (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats) == (
            True, True, True)
        assert logging.getLogger("ray.data._internal.progress").getEffectiveLevel() <= logging.INFO
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = saved


def test_every_command_module_imports():
    # No ModuleNotFoundError is swallowed any more: a broken command module fails the CLI's import.
    from jobs.cli import main

    assert {"synth", "precompute", "train", "evaluate", "promote", "infer", "ui", "demo"} <= set(main.commands)


# ---- errors: one line through one path, the traceback only with -v -------------------------------

def _one_error_line(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert line.startswith("Error: "), line
    return line.removeprefix("Error: ")


@pytest.mark.parametrize("command", [["train", "--data", "shards"], ["precompute", "--data-root", "voc", "--out", "o"]])
def test_a_config_that_is_not_a_mapping_is_one_line_in_train_and_precompute(command, tmp_path, restore_console):
    from jobs.cli import main

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    args = [*command, "--config", str(listed)]
    line = _one_error_line(CliRunner().invoke(main, args))
    assert line == f"{listed}: expected a mapping with model: and train: sections, got list"
    verbose = CliRunner().invoke(main, ["-v", *args])
    assert verbose.exit_code == 1
    assert "Traceback" in verbose.output and "frcnn.errors.ConfigError" in verbose.output
    assert verbose.output.rstrip().endswith(f"Error: {line}")


def test_synth_into_a_file_is_one_line(tmp_path, restore_console):
    from jobs.cli import main

    (tmp_path / "afile").write_text("")
    line = _one_error_line(CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "afile" / "sub")]))
    assert "Not a directory" in line and str(tmp_path / "afile" / "sub") in line


def _probe_group(error: BaseException) -> click.Group:
    from jobs.cli import _Commands

    @click.group(cls=_Commands)
    def group():
        pass

    @group.command()
    def probe():
        raise error

    return group


def test_anticipated_errors_become_one_line_and_bugs_keep_their_traceback(restore_console):
    import ray.exceptions
    from mlflow.exceptions import MlflowException

    from frcnn.errors import DatasetError, JobError
    from pipelines.precompute_rows import StorageReadError

    bad = DatasetError("voc/Annotations/000001.xml: not well-formed XML")
    assert _one_error_line(CliRunner().invoke(_probe_group(bad), ["probe"])) == str(bad)
    # An error raised in a Ray task reaches the driver wrapped, its text holding the remote traceback.
    remote = StorageReadError("s3://bucket/voc/1.jpg: cannot read: Connection reset by peer")
    wrapped = ray.exceptions.RayTaskError("read_images", "Traceback (most recent call last):\n  ...", remote)
    wrapped = wrapped.as_instanceof_cause()
    assert isinstance(wrapped, JobError) and console.anticipated(wrapped)
    assert _one_error_line(CliRunner().invoke(_probe_group(wrapped), ["probe"])) == str(remote)
    refused = MlflowException("Run 'abc' not found\n(the tracking store answered 404)")
    assert console.anticipated(refused)
    assert (_one_error_line(CliRunner().invoke(_probe_group(refused), ["probe"]))
            == "Run 'abc' not found (the tracking store answered 404)")
    # Anything else is a bug: not turned into a line, Click's runner sees the exception itself.
    bug = CliRunner().invoke(_probe_group(KeyError("boxes")), ["probe"])
    assert bug.exit_code == 1 and isinstance(bug.exception, KeyError) and not console.anticipated(bug.exception)


def test_the_commands_own_errors_are_typed_and_a_plain_value_error_is_a_bug():
    import io

    import torch

    from frcnn.errors import ConfigError, DatasetError, JobError, StorageError
    from frcnn.precision import autocast_dtype
    from frcnn.training import load_checkpoint
    from jobs.eval_detections import EvaluationError
    from jobs.models import ModelRefError, parse_registry_ref
    from jobs.train import NonFiniteLoss
    from pipelines.datasets import DatasetSource, open_split
    from pipelines.infer import AlreadyPublished
    from pipelines.lease import LeaseHeld, LeaseLost

    # The classes keep the standard bases callers catch, and are JobErrors of the kind that fits.
    assert issubclass(EvaluationError, DatasetError) and issubclass(EvaluationError, ValueError)
    assert issubclass(NonFiniteLoss, JobError) and issubclass(NonFiniteLoss, RuntimeError)
    assert issubclass(AlreadyPublished, JobError) and issubclass(AlreadyPublished, RuntimeError)
    assert issubclass(LeaseHeld, StorageError) and issubclass(LeaseHeld, FileExistsError)
    assert issubclass(LeaseLost, StorageError)
    assert issubclass(ModelRefError, JobError) and issubclass(ModelRefError, ValueError)
    # Raise sites that take a user's value raise the typed kind.
    with pytest.raises(ConfigError, match="train.amp 'fp8'") as amp:
        autocast_dtype("fp8", torch.device("cpu"))
    with pytest.raises(DatasetError, match="--dataset yolo needs --data-root") as layout:
        open_split(DatasetSource("yolo"), "train")
    with pytest.raises(ModelRefError, match="models:/a/b/c: expected models:/NAME/VERSION") as ref:
        parse_registry_ref("models:/a/b/c")
    not_ckpt = io.BytesIO()
    torch.save({"model": {}}, not_ckpt)
    not_ckpt.seek(0)
    with pytest.raises(DatasetError, match="not an frcnn checkpoint") as ckpt:
        load_checkpoint(not_ckpt)
    for err in (amp.value, layout.value, ref.value, ckpt.value, NonFiniteLoss("loss became NaN/Inf at step 3"),
                AlreadyPublished("out: published 1 of this run's 1 inputs"), LeaseLost("out: lease taken over")):
        assert console.anticipated(err), err
    # What is not typed stays a bug: a traceback, not a quiet line.
    assert not console.anticipated(ValueError("expected boxes shaped (..., 4), got (3,)"))
    assert not console.anticipated(RuntimeError("CUDA error"))


def test_a_dataset_that_does_not_fit_the_config_is_one_line_before_ray_starts(tmp_path, restore_console):
    from jobs.cli import main

    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets/Main/trainval.txt").write_text("000001\n")
    cfg = tmp_path / "one.yaml"
    cfg.write_text("model:\n  num_classes: 1\n  class_names: [unicorn]\n")
    args = ["precompute", "--data-root", str(voc), "--classes", "cat,dog", "--config", str(cfg),
            "--out", str(tmp_path / "out")]
    line = _one_error_line(CliRunner().invoke(main, args))
    assert line == (f"model class(es) 'unicorn' not in the dataset {voc} (its classes: cat, dog); "
                    "pass --classes if its list differs")
    assert not (tmp_path / "out").exists()
    verbose = CliRunner().invoke(main, ["-v", *args])
    assert verbose.exit_code == 1
    assert "Traceback" in verbose.output and "frcnn.errors.DatasetError" in verbose.output
