"""The dataset formats (``pipelines.datasets``): the same generated data read from its VOC, COCO
and YOLO layouts gives the same annotations, and every bad record is reported by file (and image
id or line) while the good images are still written. No Ray: one image is processed with
``pipelines.precompute_rows.process_item``, the function each precompute task runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from frcnn import tiny_config
from pipelines.datasets import DatasetSource, LayoutError, open_split, parse_item
from pipelines.precompute_rows import process_item
from pipelines.storage import Location
from pipelines.synth import CATEGORY_IDS, SYNTH_CLASSES, generate

N = 12
N_TRAINVAL = 10  # generate()'s trainval share of 12 images


def read(path: str) -> bytes:
    return Location.of(path).read_bytes()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("layouts")
    for fmt in ("voc", "coco", "yolo"):
        generate(root / fmt, n_images=N, seed=3, min_size=64, max_size=128, format=fmt)
    return {f: str(root / f) for f in ("voc", "coco", "yolo")}


def _annotations(fmt: str, root: str, split: str = "trainval"):
    reader = open_split(DatasetSource(fmt, root=root), split)
    out = {}
    for item in reader.items():
        ann, problems = parse_item(dataclasses.asdict(item), read, reader.classes, (), reader.classes)
        assert problems == [], problems
        key = f"{int(item.image_id) - 1:06d}" if fmt == "coco" else item.image_id
        out[key] = ann
    return reader, out


def test_three_layouts_give_the_same_annotations(layouts):
    voc_reader, voc = _annotations("voc", layouts["voc"])
    coco_reader, coco = _annotations("coco", layouts["coco"])
    yolo_reader, yolo = _annotations("yolo", layouts["yolo"])
    assert voc_reader.classes == coco_reader.classes == yolo_reader.classes == SYNTH_CLASSES
    assert coco_reader.category_ids == CATEGORY_IDS  # 1, 3, 5, 7, 9 -> labels 1..5
    assert set(voc) == set(coco) == set(yolo) and len(voc) > 0
    for key, a in voc.items():
        c, y = coco[key], yolo[key]
        # COCO: every box, crowd carried as difficult (no anchor target), exactly.
        assert np.array_equal(a.boxes, c.boxes) and np.array_equal(a.labels, c.labels)
        assert np.array_equal(a.difficult, c.difficult) and (a.width, a.height) == (c.width, c.height)
        # YOLO (normalised, no difficult flag): the non-difficult boxes, to the float32 bit.
        assert np.array_equal(a.boxes[~a.difficult], y.boxes) and np.array_equal(a.labels[~a.difficult], y.labels)


# --------------------------------------------------------------------------- COCO bad records


def _coco(tmp_path: Path, layouts, edit) -> tuple[str, str]:
    """A copy of the generated trainval instances JSON, edited; returns (json path, image dir)."""
    src = Path(layouts["coco"]) / "annotations" / "instances_trainval.json"
    doc = json.loads(src.read_text())
    edit(doc)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return str(path), str(Path(layouts["coco"]) / "trainval")


def _precompute_items(reader, root: str) -> tuple[list, list, list]:
    """Every item through one precompute task's function: (rows, skipped, warnings)."""
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=128)
    spec = {"cfg": cfg.to_dict(), "class_names": list(SYNTH_CLASSES), "dataset_classes": list(reader.classes),
            "use_difficult": False, "drop_empty": False, "jpeg_quality": 90, "data_root": root,
            "root_shown": root}
    rows, skipped, warnings = [], list(reader.problems), []
    for item in reader.items():
        res = process_item(dataclasses.asdict(item), spec)
        rows += [res.row] if res.row else []
        skipped += res.skipped
        warnings += res.warnings
    return rows, skipped, warnings


def _open(path: str, images: str):
    return open_split(DatasetSource("coco", annotations=path, images=images), "trainval")


def _first_object(doc) -> dict:
    return next(a for a in doc["annotations"] if not a["iscrowd"])


def test_coco_box_outside_image_is_reported_by_image_and_file(tmp_path, layouts):
    def edit(doc):
        ann = _first_object(doc)
        img = next(i for i in doc["images"] if i["id"] == ann["image_id"])
        ann["bbox"] = [img["width"] + 5, 1, 10, 10]  # wholly right of the image
        edit.image = img
    path, images = _coco(tmp_path, layouts, edit)
    rows, skipped, warnings = _precompute_items(_open(path, images), images)
    bad = [w for w in warnings if "outside" in w["reason"]]
    assert len(bad) == 1 and bad[0]["image_id"] == str(edit.image["id"])
    assert bad[0]["source"].endswith(edit.image["file_name"]) and "annotation id" in bad[0]["reason"]
    assert len(rows) == N_TRAINVAL and not skipped  # the image is still written, without that object


def test_coco_zero_area_box_is_reported(tmp_path, layouts):
    def edit(doc):
        ann = _first_object(doc)
        ann["bbox"][2] = 0
        edit.image_id = ann["image_id"]
    path, images = _coco(tmp_path, layouts, edit)
    rows, skipped, warnings = _precompute_items(_open(path, images), images)
    bad = [w for w in warnings if "zero-area" in w["reason"]]
    assert [w["image_id"] for w in bad] == [str(edit.image_id)] and len(rows) == N_TRAINVAL


def test_coco_unknown_image_id_is_reported(tmp_path, layouts):
    def edit(doc):
        doc["annotations"].append({"id": 99999, "image_id": 123456, "category_id": 1, "bbox": [1, 1, 5, 5],
                                   "iscrowd": 0, "area": 25})
    path, images = _coco(tmp_path, layouts, edit)
    reader = _open(path, images)
    assert [p["image_id"] for p in reader.problems] == ["123456"]
    assert "annotation id 99999: unknown image id" in reader.problems[0]["reason"]
    assert reader.problems[0]["source"] == path
    rows, _, _ = _precompute_items(reader, images)
    assert len(rows) == N_TRAINVAL


def test_coco_unknown_category_id_is_reported(tmp_path, layouts):
    def edit(doc):
        ann = _first_object(doc)
        ann["category_id"] = 2  # synth's ids are odd
        edit.image_id = ann["image_id"]
    path, images = _coco(tmp_path, layouts, edit)
    rows, _, warnings = _precompute_items(_open(path, images), images)
    bad = [w for w in warnings if "unknown category id 2" in w["reason"]]
    assert [w["image_id"] for w in bad] == [str(edit.image_id)] and len(rows) == N_TRAINVAL


def test_coco_duplicate_image_ids_are_left_out_and_reported(tmp_path, layouts):
    def edit(doc):
        dup = dict(doc["images"][0])
        dup["file_name"] = "other.jpg"
        doc["images"].append(dup)
        edit.image_id = dup["id"]
    path, images = _coco(tmp_path, layouts, edit)
    reader = _open(path, images)
    assert [p["image_id"] for p in reader.problems] == [str(edit.image_id)]
    assert "appears more than once" in reader.problems[0]["reason"]
    rows, _, _ = _precompute_items(reader, images)
    assert len(rows) == N_TRAINVAL - 1  # every other image written


def test_coco_missing_and_unreadable_files_are_skipped(tmp_path, layouts):
    images = tmp_path / "images"
    src = Path(layouts["coco"]) / "trainval"
    images.mkdir()
    files = sorted(src.iterdir())
    for f in files[2:]:
        (images / f.name).write_bytes(f.read_bytes())
    (images / files[1].name).write_bytes(b"not an image")  # files[0] is missing
    path = str(Path(layouts["coco"]) / "annotations" / "instances_trainval.json")
    rows, skipped, _ = _precompute_items(_open(path, str(images)), str(images))
    by_file = {Path(s["source"]).name: s["reason"] for s in skipped}
    assert by_file.keys() == {files[0].name, files[1].name}
    assert "not found" in by_file[files[0].name] and "does not decode" in by_file[files[1].name]
    assert len(rows) == N_TRAINVAL - 2


@pytest.mark.parametrize("content, reason", [(b"{not json", "not a JSON file"),
                                             (b'{"images": []}', "not a COCO instances file"),
                                             (b"[1, 2]", "not a COCO instances file")])
def test_json_that_is_not_coco_is_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(LayoutError, match=reason) as info:
        open_split(DatasetSource("coco", annotations=str(path), images=str(tmp_path)), "train")
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- YOLO


def _yolo_item(layouts, text: str | None, tmp_path: Path):
    """The first trainval image with its label file replaced by ``text`` (None: no label file)."""
    reader = open_split(DatasetSource("yolo", root=layouts["yolo"] + "/data.yaml"), "trainval")
    item = dataclasses.asdict(reader.items()[0])
    label = tmp_path / "label.txt"
    if text is not None:
        label.write_text(text)
    item["annotation_path"] = str(label)
    return item, reader


def test_yolo_bad_lines_are_reported_with_file_and_line(tmp_path, layouts):
    text = "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n2 0.5 1.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n\n3 0.1 0.1 0.3 0.1 0.2 0.4\n"
    item, reader = _yolo_item(layouts, text, tmp_path)
    ann, problems = parse_item(item, read, SYNTH_CLASSES, (), reader.classes)
    where = {p.source.rsplit(":", 1)[1]: p.reason for p in problems}
    assert all(p.source.startswith(item["annotation_path"] + ":") for p in problems)
    assert where.keys() == {"2", "3", "4"}
    assert "4 columns" in where["2"] and "outside [0, 1]" in where["3"] and "class id 7 outside names" in where["4"]
    # Line 1 is a box, line 6 a polygon: its bounding box.
    assert ann.labels.tolist() == [1, 4]
    w, h = ann.width, ann.height
    np.testing.assert_allclose(ann.boxes[1], np.float32([0.1 * w, 0.1 * h, 0.3 * w, 0.4 * h]), atol=1e-3)


def test_yolo_missing_label_file_is_a_negative(tmp_path, layouts):
    item, reader = _yolo_item(layouts, None, tmp_path)
    ann, problems = parse_item(item, read, SYNTH_CLASSES, (), reader.classes)
    assert problems == [] and len(ann) == 0 and ann.width > 0


def test_yolo_names_as_mapping_and_list(tmp_path):
    from pipelines.datasets.yolo import _names

    assert _names({0: "a", 1: "b"}, "x") == ("a", "b") == _names(["a", "b"], "x")
    with pytest.raises(LayoutError, match="names"):
        _names({0: "a", 2: "b"}, "x")
