"""Tests for the PASCAL VOC layout reader (pipelines.voc)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.voc import (
    VOC_CLASSES,
    AnnotationError,
    Problem,
    VocLayoutError,
    find_voc_dirs,
    list_split,
    load_class_names,
    parse_annotation,
    read_annotation,
    read_bytes,
    resolve_filesystem,
    voc_to_xyxy,
    xyxy_to_voc,
)

SRC = "VOC2007/Annotations/000042.xml"


def _xml(objects: str = "", size: str = "<size><width>100</width><height>80</height><depth>3</depth></size>") -> bytes:
    return f"<annotation><filename>000042.jpg</filename>{size}{objects}</annotation>".encode()


def _obj(name: str = "dog", box: tuple = (11, 21, 40, 60), extra: str = "") -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def _parse(xml: bytes):
    return parse_annotation(xml, SRC, VOC_CLASSES)


# --------------------------------------------------------------------------- coordinates


def test_known_example_and_round_trip() -> None:
    xyxy = voc_to_xyxy([1, 1, 10, 10])
    assert xyxy.dtype == np.float32
    np.testing.assert_array_equal(xyxy, [0, 0, 10, 10])  # 10 pixels wide
    boxes = np.array([[1, 2, 10, 20], [5.5, 6, 7.25, 300]], dtype=np.float64)
    np.testing.assert_allclose(xyxy_to_voc(voc_to_xyxy(boxes)), boxes)
    original = boxes.copy()
    voc_to_xyxy(boxes)
    np.testing.assert_array_equal(boxes, original)  # never mutates the caller's array


# --------------------------------------------------------------------------- parsing


def test_parse_good_annotation() -> None:
    objects = _obj("dog", (11, 21, 40, 60), "<difficult>1</difficult>") + _obj(
        "person", ("1", "1", "273.5", "80"), "<truncated>1</truncated>"
    )
    ann, problems = _parse(_xml(objects, "<size><width>300</width><height>80</height></size>"))
    assert problems == []
    assert (ann.image_id, ann.width, ann.height) == ("000042", 300, 80)
    np.testing.assert_array_equal(ann.boxes, [[10, 20, 40, 60], [0, 0, 273.5, 80]])
    assert ann.boxes.dtype == np.float32 and ann.labels.dtype == np.int64
    assert ann.labels.tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert ann.difficult.tolist() == [True, False]
    assert ann.truncated.tolist() == [False, True]


def test_billion_laughs_is_rejected() -> None:
    bomb = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>&lol3;</filename></annotation>"""
    with pytest.raises(AnnotationError, match="forbidden XML entity/DTD") as info:
        _parse(bomb)
    assert info.value.source == SRC and SRC in str(info.value)


def test_malformed_xml() -> None:
    with pytest.raises(AnnotationError, match="XML does not parse") as info:
        _parse(b"<annotation><size><width>10</width></annotation")
    assert str(info.value).startswith(SRC)


@pytest.mark.parametrize(
    "size",
    ["", "<size><width>100</width></size>", "<size><width>0</width><height>5</height></size>",
     "<size><width>abc</width><height>5</height></size>"],
)  # fmt: skip
def test_missing_or_invalid_size(size: str) -> None:
    with pytest.raises(AnnotationError, match="size") as info:
        _parse(_xml(_obj(), size=size))
    assert SRC in str(info.value)


def _one_problem(objects: str, expected: str) -> tuple:
    ann, problems = _parse(_xml(_obj("cat") + objects))
    assert len(problems) == 1, problems
    assert isinstance(problems[0], Problem)
    assert problems[0].source == SRC and SRC in str(problems[0])
    assert expected in problems[0].reason, problems[0].reason
    return ann, problems[0]


def test_missing_bndbox_is_dropped() -> None:
    ann, _ = _one_problem("<object><name>dog</name></object>", "missing <bndbox>")
    assert len(ann) == 1  # only the good cat is left


def test_non_numeric_coordinate_is_dropped() -> None:
    ann, _ = _one_problem(_obj("dog", (1, 1, "ten", 5)), "non-numeric")
    assert len(ann) == 1


def test_inverted_box_is_dropped() -> None:
    ann, _ = _one_problem(_obj("dog", (50, 10, 20, 30)), "inverted")
    assert len(ann) == 1


def test_zero_area_box_is_dropped() -> None:
    # xmax = xmin - 1 is zero pixels wide; xmin == xmax would be one pixel wide.
    ann, _ = _one_problem(_obj("dog", (20, 10, 19, 30)), "zero-area")
    assert len(ann) == 1
    ann, problems = _parse(_xml(_obj("dog", (20, 10, 20, 30))))
    assert problems == [] and ann.boxes[0, 2] - ann.boxes[0, 0] == 1


def test_box_past_the_image_is_clipped() -> None:
    ann, problem = _one_problem(_obj("dog", (0, 5, 120, 30)), "clipped")
    np.testing.assert_array_equal(ann.boxes[1], [0, 4, 100, 30])
    assert "past the 100x80 image" in problem.reason


def test_box_entirely_outside_is_dropped() -> None:
    ann, _ = _one_problem(_obj("dog", (150, 5, 190, 30)), "entirely outside")
    assert len(ann) == 1


def test_unknown_class_is_dropped_and_named() -> None:
    ann, problem = _one_problem(_obj("unicorn"), "unknown class 'unicorn'")
    assert ann.labels.tolist() == [VOC_CLASSES.index("cat") + 1]


def test_empty_image_is_valid() -> None:
    ann, problems = _parse(_xml())
    assert problems == []
    assert ann.boxes.shape == (0, 4) and ann.boxes.dtype == np.float32
    assert ann.labels.shape == (0,) and ann.difficult.shape == (0,) and ann.truncated.shape == (0,)


def test_problems_keep_object_order() -> None:
    objects = _obj("unicorn") + _obj("dog", (50, 10, 20, 30)) + "<object><name>cat</name></object>"
    _, problems = _parse(_xml(objects))
    assert [p.reason.split(":")[0] for p in problems] == ["object #0 (unicorn)", "object #1", "object #2 (cat)"]


# --------------------------------------------------------------------------- layout


def _make_year(devkit: Path, year: str, ids: list[str], split: str = "train", ext: str = ".jpg") -> Path:
    year_dir = devkit / f"VOC{year}"
    (year_dir / "Annotations").mkdir(parents=True)
    (year_dir / "JPEGImages").mkdir()
    (year_dir / "ImageSets" / "Main").mkdir(parents=True)
    for image_id in ids:
        (year_dir / "Annotations" / f"{image_id}.xml").write_bytes(_xml(_obj()))
        (year_dir / "JPEGImages" / f"{image_id}{ext}").write_bytes(b"")
    (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return year_dir


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    devkit = tmp_path / "data" / "VOCdevkit"
    _make_year(devkit, "2007", ["000001", "000002"])
    _make_year(devkit, "2012", ["2008_000001"], ext=".png")
    return tmp_path / "data"


def test_find_voc_dirs_accepts_three_root_forms(voc_root: Path) -> None:
    both = [str(voc_root / "VOCdevkit" / "VOC2007"), str(voc_root / "VOCdevkit" / "VOC2012")]
    assert find_voc_dirs(str(voc_root)) == both
    assert find_voc_dirs(str(voc_root / "VOCdevkit")) == both
    assert find_voc_dirs(str(voc_root / "VOCdevkit" / "VOC2012")) == both[1:]
    assert find_voc_dirs(str(voc_root), years=("2012", "2007")) == both[::-1]
    assert find_voc_dirs(str(voc_root), years=["VOC2007"]) == both[:1]


def test_find_voc_dirs_errors_name_path_and_gap(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(VocLayoutError, match="missing VOC2010"):
        find_voc_dirs(str(voc_root), years=("2007", "2010"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VocLayoutError, match="no VOC year directory") as info:
        find_voc_dirs(str(empty))
    assert str(empty) in str(info.value)
    with pytest.raises(VocLayoutError, match="does not exist"):
        find_voc_dirs(str(tmp_path / "nope"))
    (voc_root / "VOCdevkit" / "VOC2009").mkdir()
    with pytest.raises(VocLayoutError, match="VOC2009: missing Annotations"):
        find_voc_dirs(str(voc_root))


def test_list_split_joins_years_with_unique_ids(voc_root: Path) -> None:
    items = list_split(str(voc_root), "train")
    assert [i.image_id for i in items] == ["2007/000001", "2007/000002", "2012/2008_000001"]
    assert items[2].image_path.endswith("VOC2012/JPEGImages/2008_000001.png")
    assert items[0].annotation_path.endswith("VOC2007/Annotations/000001.xml")
    single = list_split(str(voc_root), "train", years=("2007",))
    assert [i.image_id for i in single] == ["000001", "000002"]


def test_list_split_missing_image_and_missing_split(voc_root: Path) -> None:
    (voc_root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    items = list_split(str(voc_root), "train", years=("2007",))
    assert items[1].image_path is None
    with pytest.raises(VocLayoutError, match=r"ImageSets/Main/val\.txt"):
        list_split(str(voc_root), "val")


def test_class_names_from_classes_txt(voc_root: Path) -> None:
    assert load_class_names(str(voc_root)) == VOC_CLASSES
    for year in ("2007", "2012"):
        (voc_root / "VOCdevkit" / f"VOC{year}" / "classes.txt").write_text("ball\n\nbox\n")
    assert load_class_names(str(voc_root)) == ("ball", "box")
    (voc_root / "VOCdevkit" / "VOC2012" / "classes.txt").write_text("ball\n")
    with pytest.raises(VocLayoutError, match="disagree"):
        load_class_names(str(voc_root))


def test_filesystem_helpers_local_and_file_uri(voc_root: Path) -> None:
    target = voc_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml"
    fs, path = resolve_filesystem(str(target))
    assert read_bytes(fs, path) == target.read_bytes()
    fs, path = resolve_filesystem(target.as_uri())
    assert path == str(target) and read_bytes(fs, path) == target.read_bytes()
    ann, problems = read_annotation(target.as_uri(), VOC_CLASSES)
    assert ann.image_id == "000001" and len(ann) == 1 and problems == []
    # URIs stay URIs, so workers can resolve the returned paths themselves.
    items = list_split(voc_root.as_uri(), "train", years=("2007",))
    assert items[0].annotation_path.startswith("file://")
