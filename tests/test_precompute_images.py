"""Precompute's per-image step (no Ray) on images as cameras store them: a picture stored sideways
with EXIF Orientation 6, annotated on the picture a viewer shows (as VOC tools do), gives exactly
the row of the upright picture; one annotated on the stored pixels is reported with the hint."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frcnn.config import tiny_config
from pipelines.precompute_rows import process_item
from pipelines.synth import SYNTH_CLASSES
from pipelines.voc import list_split


@pytest.fixture(scope="module")
def data(synth_dataset):
    root = synth_dataset(n_images=6, seed=5, min_size=80, max_size=120).root
    cfg = tiny_config(5, SYNTH_CLASSES, canvas=96)
    spec = {"cfg": cfg.to_dict(), "class_names": list(SYNTH_CLASSES), "dataset_classes": list(SYNTH_CLASSES),
            "use_difficult": True, "drop_empty": False, "jpeg_quality": 95, "data_root": str(root),
            "root_shown": str(root)}
    item = next(dataclasses.asdict(i) for i in list_split(str(root), "trainval")
                if "<object>" in Path(i.annotation_path).read_text() and i.image_path.endswith(".jpg"))
    return spec, item


def _stored_sideways(item: dict, tmp: Path) -> dict:
    """The item's picture as a phone stores it: pixels turned anticlockwise, EXIF Orientation 6."""
    upright = Image.open(item["image_path"]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp / "phone.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format="PNG", exif=exif)  # lossless
    return {**item, "image_path": str(path)}


def test_a_sideways_photo_gives_the_upright_row(data, tmp_path):
    spec, item = data
    want = process_item(item, spec)
    got = process_item(_stored_sideways(item, tmp_path), spec)
    assert want.row is not None and got.row is not None and got.warnings == want.warnings == ()
    for key, value in want.row.items():
        np.testing.assert_array_equal(np.asarray(got.row[key]), np.asarray(value), err_msg=key)
    assert len(want.row["pos_anchor_index"]) > 0
    assert (got.row["orig_width"], got.row["orig_height"]) == Image.open(item["image_path"]).size
    np.testing.assert_array_equal(got.fit.best_iou, want.fit.best_iou)


def test_an_annotation_of_the_stored_pixels_is_reported_with_the_hint(data, tmp_path):
    spec, item = data
    side = _stored_sideways(item, tmp_path)
    w, h = Image.open(item["image_path"]).size
    xml = Path(item["annotation_path"]).read_text()
    swapped = xml.replace(f"<width>{w}</width>", f"<width>{h}</width>").replace(
        f"<height>{h}</height>", f"<height>{w}</height>")
    ann = tmp_path / "stored.xml"
    ann.write_text(swapped)
    result = process_item({**side, "annotation_path": str(ann)}, spec)
    # (the boxes may also fall outside the swapped size: those are reported by the annotation's parser)
    (warning,) = [w for w in result.warnings if "differs from the image's" in w["reason"]]
    assert warning["source"] == str(ann)
    assert warning["reason"].startswith(f"annotation <size> {h}x{w} differs from the image's {w}x{h} as shown")
    assert warning["reason"].endswith("(the annotation has the stored pixels' size: was it made without the "
                                      "EXIF orientation?)")


def test_a_bomb_is_skipped_with_its_reason(data, tmp_path):
    spec, item = data
    big = Image.new("1", (1, 1))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    # Patch the 1x1 PNG's header to declare 20000 x 20000 pixels (CRC fixed), data left as is.
    import struct
    import zlib

    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(png))
    result = process_item({**item, "image_path": str(path)}, spec)
    assert result.row is None
    assert [(s["source"], s["reason"]) for s in result.skipped] == [
        (str(path), "decompression bomb refused: 400,000,000 pixels, over the limit of 178,956,970")]
