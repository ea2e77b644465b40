"""Images as cameras make them, through ``infer`` (``run_inference``: real Ray Data) and the
``Detector`` the registered pyfunc calls: the same picture stored sideways with EXIF Orientation
6, at 16 bits, or in CMYK gives the detections of its plain 8-bit RGB version, in the frame a
viewer shows; a decompression bomb is refused with its reason while the other images are written.

The model is a tiny initialised detector: its detections on a picture are deterministic, so
"the same detections" is checked to float precision; an all-white picture (what a clipped
16-bit image was) is checked to give different ones, so the comparison can tell them apart.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn import FasterRCNN, tiny_config
from frcnn.inference import Detector
from frcnn.training import TrainConfig, checkpoint_state
from pipelines import infer
from pipelines.synth import SYNTH_CLASSES, render_image

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

W, H = 150, 110  # not square: a rotation that is not applied shows as a swapped size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> bytes:
    cfg = tiny_config(num_classes=5, class_names=SYNTH_CLASSES, canvas=128)
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(checkpoint_state(FasterRCNN(cfg), None, 0, 0, cfg, TrainConfig()), buf)
    return buf.getvalue()


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _files() -> dict[str, bytes]:
    upright, _ = render_image(np.random.default_rng(3), W, H)
    upright = upright.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise; a viewer turns it clockwise
    grey8 = np.asarray(upright.convert("L"))
    return {
        "upright.png": _save(upright, "PNG"),
        "phone.png": _save(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif),
        "grey8.png": _save(Image.fromarray(grey8), "PNG"),
        "grey16.png": _save(Image.fromarray(grey8.astype(np.uint16) * 257), "PNG"),
        "white.png": _save(Image.new("RGB", (W, H), (255, 255, 255)), "PNG"),
        "print.tif": _save(upright.convert("CMYK"), "TIFF"),
        "bomb.png": _bomb_png(40000, 40000),
    }


def _same(a: dict, b: dict) -> None:
    assert (a["width"], a["height"]) == (b["width"], b["height"])
    assert a["labels"] == b["labels"]
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)


def test_infer_sees_images_as_a_viewer_shows_them(ckpt, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for name, data in _files().items():
        (inp / name).write_bytes(data)
    summary = infer.run_inference(str(inp), str(out), ckpt, progress=False, batch_size=2)
    assert (summary.written, summary.failed) == (6, 1)
    rows = {r["image_id"]: r for r in infer.read_published(str(out)).to_pylist()}
    up = rows["upright.png"]
    assert (up["width"], up["height"]) == (W, H) and len(up["scores"]) > 0
    _same(rows["phone.png"], up)  # the viewer's frame: 150 x 110, the upright picture's boxes
    _same(rows["print.tif"], up)
    _same(rows["grey16.png"], rows["grey8.png"])
    assert rows["grey8.png"]["scores"] != rows["white.png"]["scores"]  # the comparison can tell them apart
    (err,) = infer.read_published(str(out), errors=True).to_pylist()
    assert err["image_id"] == "bomb.png"
    assert err["reason"] == "decompression bomb refused: 1,600,000,000 pixels, over the limit of 178,956,970"


def test_the_pyfuncs_detector_decodes_the_same_way(ckpt):
    """The registered model's ``predict`` calls ``Detector.predict`` on the bytes it is given."""
    files = _files()
    detector = Detector.from_checkpoint(ckpt, "cpu", threads=1)
    names = list(files)
    got = dict(zip(names, detector.predict([files[n] for n in names]), strict=True))
    up = got["upright.png"]
    for a, b in (("phone.png", "upright.png"), ("print.tif", "upright.png"), ("grey16.png", "grey8.png")):
        assert (got[a].width, got[a].height) == (got[b].width, got[b].height) and got[a].error is None
        np.testing.assert_array_equal(got[a].labels, got[b].labels)
        np.testing.assert_allclose(got[a].boxes, got[b].boxes, atol=1e-4)
    assert (up.width, up.height) == (W, H) and len(up.scores) > 0
    assert got["bomb.png"].error.startswith("decompression bomb refused: 1,600,000,000 pixels")
