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


def test_demo_ctrl_c_says_where_it_stopped_and_exits_130(tmp_path, monkeypatch):
    import pipelines.synth
    from jobs.demo import demo_cmd

    def interrupted(*args, **kwargs):  # Ctrl-C while the first stage runs
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.synth, "generate", interrupted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(demo_cmd, ["--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 130, result.output
    assert "interrupted during generate" in result.output
    assert f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}" in result.output
    assert f"frcnn-jobs demo --workdir {tmp_path / 'demo'}" in result.output
