"""Tests for the synthetic VOC-layout dataset generator (pipelines.synth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.synth import SYNTH_CLASSES, generate, render_image, shape_mask
from pipelines.voc import find_voc_dirs, list_split, load_class_names, parse_annotation

N_IMAGES = 40


@pytest.fixture(scope="module")
def dataset(synth_dataset) -> tuple[Path, dict]:
    synth = synth_dataset(n_images=N_IMAGES, seed=3, min_size=160, max_size=400)  # generate()'s default sizes
    return synth.root, synth.summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", n_images=6, seed=7)
    generate(tmp_path / "b", n_images=6, seed=7)
    generate(tmp_path / "c", n_images=6, seed=8)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 6 * 2 + 4 + 1  # images + xmls + split files + classes.txt
    assert a == b
    assert a != c


def test_layout_and_split_sizes(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert find_voc_dirs(str(root)) == [str(root / "VOCdevkit" / "VOC2007")]
    assert load_class_names(str(root)) == SYNTH_CLASSES
    assert summary["splits"] == {"train": 28, "val": 6, "trainval": 34, "test": 6}
    splits = {s: [i.image_id for i in list_split(str(root), s)] for s in ("train", "val", "trainval", "test")}
    assert {s: len(v) for s, v in splits.items()} == summary["splits"]
    assert sorted(splits["train"] + splits["val"]) == splits["trainval"]
    assert set(splits["trainval"]).isdisjoint(splits["test"])
    assert len(set(splits["trainval"]) | set(splits["test"])) == N_IMAGES
    assert all(i.image_path is not None for i in list_split(str(root), "test"))


def test_annotations_parse_cleanly_and_fit_images(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    labels = []
    for item in list_split(str(root), "trainval") + list_split(str(root), "test"):
        data = Path(item.annotation_path).read_bytes()
        ann, problems = parse_annotation(data, item.annotation_path, SYNTH_CLASSES)
        assert problems == []
        with Image.open(item.image_path) as image:
            assert image.size == (ann.width, ann.height) and image.mode == "RGB"
        b = ann.boxes
        assert np.all(b[:, :2] >= 0) and np.all(b[:, 2] <= ann.width) and np.all(b[:, 3] <= ann.height)
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        labels.extend(ann.labels.tolist())
    assert set(labels) == set(range(1, len(SYNTH_CLASSES) + 1))  # every class appears
    assert len(labels) == summary["objects"] == sum(summary["objects_per_class"].values())


@pytest.mark.parametrize("name", SYNTH_CLASSES)
def test_shape_mask_touches_all_edges(name: str) -> None:
    mask = shape_mask(name, 37, 23, np.random.default_rng(0))
    assert mask.any(axis=0).all() and mask.any(axis=1).all()  # tight: no empty border row/column
    assert abs(mask.shape[0] - 23) <= 1 and abs(mask.shape[1] - 37) <= 1


def test_drawn_pixels_match_recorded_boxes() -> None:
    checked = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        image, objects = render_image(rng, 240, 180)
        pixels = np.asarray(image)
        for obj in objects:
            if obj["difficult"]:
                continue  # low-contrast colours may legitimately occur in the background
            x1, y1, x2, y2 = (int(v) for v in obj["box"])
            assert 0 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 180
            # Look a few pixels beyond the box: no pixel of the object's colour may be there.
            wx1, wy1 = max(x1 - 5, 0), max(y1 - 5, 0)
            window = pixels[wy1 : y2 + 5, wx1 : x2 + 5]
            ys, xs = np.nonzero(np.all(window == obj["color"], axis=-1))
            found = (xs.min() + wx1, ys.min() + wy1, xs.max() + 1 + wx1, ys.max() + 1 + wy1)
            assert found == (x1, y1, x2, y2), (seed, obj, found)
            checked += 1
    assert checked >= 6


def test_truncated_difficult_and_empty_rates() -> None:
    n_images, objects = 200, []
    empty = 0
    for seed in range(n_images):
        _, objs = render_image(np.random.default_rng(seed), 160, 160)
        objects.extend(objs)
        empty += not objs
    truncated = np.mean([o["truncated"] for o in objects])
    difficult = np.mean([o["difficult"] for o in objects])
    assert 0.05 <= truncated <= 0.2 and 0.02 <= difficult <= 0.1, (truncated, difficult)
    assert 1 <= empty <= 15
    assert {o["name"] for o in objects} == set(SYNTH_CLASSES)
    assert all(isinstance(o["box"][0], float) for o in objects)


def test_sizes_draw_from_the_given_pairs(tmp_path: Path) -> None:
    pairs = [(500, 375), (375, 500), (64, 48)]
    summary = generate(tmp_path / "s", n_images=12, seed=5, sizes=pairs)
    jpegs = sorted((tmp_path / "s" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    seen = []
    for p in jpegs:
        with Image.open(p) as im:
            seen.append(im.size)
        ann, _ = parse_annotation((p.parents[1] / "Annotations" / f"{p.stem}.xml").read_bytes(), p.name,
                                  SYNTH_CLASSES)
        assert (ann.width, ann.height) == seen[-1]
    assert set(seen) <= set(pairs) and len(set(seen)) > 1 and summary["images"] == 12
    with pytest.raises(ValueError, match="sides >= 32"):
        generate(tmp_path / "c", n_images=1, sizes=[(20, 500)])
