"""The command line's paths that open a tracking store: errors of the commands that use MLflow
(evaluate, infer, promote) reach the user as one line, and the demo's Ctrl-C says where it stopped."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.test_cli import _one_error_line

pytestmark = pytest.mark.integration


def test_evaluate_infer_and_promote_errors_are_one_line(tracking_uri, tmp_path, monkeypatch):
    from jobs.cli import main

    monkeypatch.chdir(tmp_path)
    line = _one_error_line(CliRunner().invoke(main, ["evaluate", "--detections", "d.parquet", "--data-root", "voc"]))
    assert line == f"{tmp_path / 'voc'}: data root does not exist or is not a directory"
    line = _one_error_line(CliRunner().invoke(main, ["infer", "--model", "gone.pt", "--input", "in", "--output", "o"]))
    assert line == "gone.pt: not a models:/ URI, an MLflow run id, or an existing checkpoint path"
    line = _one_error_line(CliRunner().invoke(main, ["promote", "nope/1", "--alias", "champion"]))
    assert line.startswith("nope/1: no such registered model version")


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
