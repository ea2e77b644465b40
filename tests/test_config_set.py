"""``--set key=value``: parsed with YAML's scalar rules, checked against the config dataclasses,
applied through the one loader (``frcnn.config.load_config``)."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from frcnn.config import ModelConfig, load_config, tiny_config
from frcnn.errors import ConfigError
from frcnn.overrides import Overrides
from frcnn.training import TrainConfig
from jobs.train_eval import EarlyStop


def test_values_follow_yaml_scalars_and_the_field_types():
    ov = Overrides.parse(["model.rpn.nms_thresh=0.6", "train.epochs=3", "train.base_lr=1e-3",
                          "model.anchors.scales=[1, 2]", "model.backbone.weights=null", "model.roi.pool=pool",
                          "train.amp=off"])
    assert dict(ov.items) == {"model.rpn.nms_thresh": 0.6, "train.epochs": 3, "train.base_lr": 0.001,
                              "model.anchors.scales": (1.0, 2.0), "model.backbone.weights": None,
                              "model.roi.pool": "pool", "train.amp": "off"}
    # The last of a repeated key wins, as on a command line.
    assert dict(Overrides.parse(["train.epochs=3", "train.epochs=5"]).items) == {"train.epochs": 5}
    # What --set prints back reads back to the same settings.
    assert Overrides.parse(ov.args()) == ov


def test_overrides_go_through_the_loader():
    ov = Overrides.parse(["model.rpn.nms_thresh=0.6", "model.anchors.scales=[1, 2]", "train.epochs=3"])
    model, train = load_config("tiny", ov)
    base, _ = load_config("tiny")
    assert model == base.replace(rpn=base.rpn.__class__(**{**base.rpn.__dict__, "nms_thresh": 0.6}),
                                 anchors=base.anchors.__class__(stride=16, scales=(1.0, 2.0), ratios=(0.5, 1.0, 2.0)))
    assert TrainConfig.from_dict(train).epochs == 3
    # Without a model section in the file, model.* settings change the caller's base config.
    assert ov.model(tiny_config()).rpn.nms_thresh == 0.6 and ov.model(tiny_config()).anchors.scales == (1.0, 2.0)
    assert ov.train({"epochs": 9, "seed": 4}) == {"epochs": 3, "seed": 4}


@pytest.mark.parametrize(("text", "message"), [
    ("model.rpn.nms=0.3", r"--set model\.rpn\.nms: unknown key 'nms' in model\.rpn; known: .*nms_thresh"),
    ("train.epoch=3", r"--set train\.epoch: unknown key 'epoch' in train; known: .*epochs"),
    ("optim.lr=0.1", r"--set optim\.lr: unknown key; keys start with model\. or train\."),
    ("model.rpn=1", r"--set model\.rpn: a section; set one of its keys"),
    ("model.rpn.nms_thresh.x=1", r"--set model\.rpn\.nms_thresh\.x: unknown key 'x' in model\.rpn\.nms_thresh"),
    ("train.epochs=abc", r"--set train\.epochs: expected int, got 'abc'"),
    ("train.epochs=1.5", r"--set train\.epochs: expected int, got 1\.5"),
    ("train.epochs=true", r"--set train\.epochs: expected int, got True"),
    ("model.rpn.nms_thresh=high", r"--set model\.rpn\.nms_thresh: expected float, got 'high'"),
    ("model.anchors.scales=3", r"--set model\.anchors\.scales: expected tuple\[float, \.\.\.\], got 3"),
    ("model.canvas.mean=[1, 2]", r"--set model\.canvas\.mean: expected tuple\[float, float, float\]"),
    ("train.epochs", r"--set train\.epochs: expected KEY=VALUE"),
])
def test_bad_keys_and_types_are_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        Overrides.parse([text])


def test_a_value_the_config_refuses_names_the_file():
    with pytest.raises(ConfigError, match=r"tiny\.yaml: model: canvas 100x192 must be a multiple of the stride 16"):
        load_config("tiny", Overrides.parse(["model.canvas.height=100"]))


def test_config_files_are_type_checked_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": "ten"}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.epochs: expected int, got 'ten'"):
        load_config(str(bad))
    assert ModelConfig.from_dict({"rpn": {"nms_thresh": 1}}).rpn.nms_thresh == 1.0  # an int is a float
    bad.write_text("train:\n  amp: off\n")
    with pytest.raises(ConfigError, match=r"train\.amp: expected str, got False \(quote it"):
        load_config(str(bad))


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_the_cli_refuses_before_any_work(command, tmp_path):
    from jobs.cli import main

    args = {"train": ["train", "--data", str(tmp_path / "none")],
            "precompute": ["precompute", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]}[command]
    res = CliRunner().invoke(main, [*args, "--config", "tiny", "--set", "model.rpn.nms=0.3"])
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--set': model.rpn.nms: unknown key 'nms' in model.rpn" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()


def test_early_stop_counts_validations_without_a_gain():
    stop = EarlyStop(patience=2)
    seen = [stop.update(m, e) for e, m in enumerate([0.1, 0.3, 0.3, 0.2, 0.4, 0.4, 0.1])]
    assert seen == [False, False, False, True, False, False, True]
    assert (stop.best, stop.best_epoch, stop.stale) == (0.4, 4, 2)
    # Its state travels in checkpoint metrics: a restarted group goes on counting.
    again = EarlyStop.resume(2, {"epoch": 5, **EarlyStop(2, 0.4, 4, 1).metrics()})
    assert again.update(0.39, 6) is True
    assert EarlyStop(patience=0).update(0.0, 0) is False and not any(EarlyStop(0).update(0.0, e) for e in range(50))
