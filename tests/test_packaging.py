"""Configs ship inside the package and load through one loader with clear errors."""

from __future__ import annotations

import pytest

from frcnn import ModelConfig, tiny_config
from frcnn.config import CONFIG_NAMES, ConfigError, config_file, flatten, load_config
from frcnn.training import TrainConfig
from pipelines.voc import VOC_CLASSES

SYNTH_CLASSES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


def test_packaged_configs_load_by_name():
    assert set(CONFIG_NAMES) == {"tiny", "demo", "vgg16_voc"}
    tiny, tiny_train = load_config("tiny")
    assert tiny == tiny_config(5, SYNTH_CLASSES) and tiny_train == {}
    demo, demo_train = load_config("demo")
    assert demo == tiny  # the demo is the tiny detector plus a schedule
    assert TrainConfig.from_dict(demo_train).batch_size == 8
    vgg, _ = load_config("vgg16_voc")
    # The VOC recipe (README "The VOC recipe"), not the walkthrough's defaults; checked in test_boxes.
    assert vgg.backbone.name == "vgg16" and vgg.num_classes == 20 and vgg.class_names[0] == "aeroplane"
    assert ModelConfig.from_yaml("vgg16_voc") == vgg
    assert config_file("tiny").parent.name == "configs" and config_file("tiny").parent.parent.name == "frcnn"


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "expected a mapping with model: and train: sections, got list"),
    ("just text\n", "expected a mapping with model: and train: sections, got str"),
    ("model:\n  num_classes: 3\ntrian:\n  epochs: 2\n", "unknown key(s) ['trian']"),
    ("model:\n  num_clases: 3\n", "model: unknown key(s) ['num_clases']"),
    ("model:\n  rpn:\n    nms: 0.5\n", "model.rpn: unknown key(s) ['nms']"),
    ("model:\n  rpn: 0.5\n", "model.rpn: expected a mapping, got float"),
    ("model:\n  num_classes: 3\ntrain:\n  epoch: 2\n", "train: unknown key(s) ['epoch']"),
    ("model:\n  canvas: {height: 100, width: 96}\n", "model: canvas 100x96 must be a multiple of the stride 16"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    with pytest.raises(ValueError, match="bad.yaml"):  # ConfigError is a ValueError: CLIs report it as such
        ModelConfig.from_yaml(path)


def test_missing_config_names_the_packaged_ones(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file .*tiny, demo, vgg16_voc"):
        load_config(tmp_path / "nope.yaml")


def test_sections_and_bare_model_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert load_config(path) == (None, {"epochs": 3})
    path.write_text("num_classes: 3\nanchors:\n  scales: [2, 4]\n")
    model, train = load_config(path)
    assert model.num_classes == 3 and model.anchors.scales == (2, 4) and train == {}
    path.write_text("")
    assert load_config(path) == (None, {})


def test_one_flattener_for_model_and_train_params():
    cfg = tiny_config()
    flat = cfg.flat("model")
    assert flat["model.rpn.nms_thresh"] == cfg.rpn.nms_thresh and flat["model.canvas.height"] == 192
    assert flat == flatten(cfg.to_dict(), "model")
    train = flatten(TrainConfig().to_dict(), "train")
    assert train["train.epochs"] == TrainConfig().epochs
    assert all(k.startswith("train.") and k.count(".") == 1 for k in train)


def test_config_files_match_the_code():
    assert ModelConfig.from_yaml(config_file("tiny")) == tiny_config(5, SYNTH_CLASSES)
    voc = ModelConfig.from_yaml("vgg16_voc")  # the VOC recipe: VOC's classes, the paper's scale rule
    assert (voc.num_classes, voc.class_names) == (20, VOC_CLASSES)
    assert (voc.canvas.short_side, voc.canvas.max_long_side) == (600, 1000)
