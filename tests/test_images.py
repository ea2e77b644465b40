"""``frcnn.images.decode_image``: the one decode path, checked pixel by pixel against values
computed here (numpy on the source arrays), for each kind of file a camera or an export makes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from frcnn.images import MAX_PIXELS, ImageRejected, decode_error_reason, decode_image

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # 7 wide, 5 high: not square


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (PIL writes no 16-bit RGB): ``rows`` is the filtered scanline data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# What a viewer shows for each EXIF orientation, given the stored array (numpy's view of it).
VIEWED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 degrees anticlockwise: turn it clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_viewers_frame(orientation):
    data = _encode(Image.fromarray(RGB), exif=_exif(orientation))
    got = np.asarray(decode_image(data))
    want = VIEWED[orientation](RGB)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_a_sideways_jpeg_comes_out_upright():
    """A phone photo stored sideways (Orientation 6): width and height as shown, pixels close to
    the upright picture's (JPEG is lossy; a smooth picture keeps the error small)."""
    yy, xx = np.mgrid[0:48, 0:64]
    upright = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)  # 64 wide, 48 high
    stored = np.rot90(upright, k=1)  # what the sensor wrote: 48 wide, 64 high
    data = _encode(Image.fromarray(np.ascontiguousarray(stored)), "JPEG", quality=95, exif=_exif(6))
    got = decode_image(data)
    assert (got.width, got.height) == (64, 48)
    assert np.abs(np.asarray(got).astype(int) - upright).mean() < 2.0


def test_16_bit_greyscale_is_scaled_not_clipped():
    v8 = RNG.integers(0, 256, size=(6, 9), dtype=np.uint16)
    v16 = v8 * 257  # the same picture at 16 bits: 255 -> 65535
    data = _encode(Image.fromarray(v16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = np.asarray(decode_image(data))
    np.testing.assert_array_equal(got, np.repeat(v8.astype(np.uint8)[..., None], 3, -1))
    # Values between the 8-bit steps round to the nearest: round(v * 255 / 65535).
    odd = np.array([[0, 128, 129, 32767, 32768, 65534, 65535, 1000]], dtype=np.uint16)
    got = np.asarray(decode_image(_encode(Image.fromarray(odd))))[..., 0]
    np.testing.assert_array_equal(got, [[round(int(v) * 255 / 65535) for v in odd[0]]])


def test_16_bit_rgb_png_keeps_its_picture():
    v8 = RGB.astype(np.uint16)
    v16 = (v8 * 257).astype(">u2")  # PNG stores big-endian samples
    rows = b"".join(b"\x00" + v16[y].tobytes() for y in range(v16.shape[0]))
    data = _png(RGB.shape[1], RGB.shape[0], 16, 2, rows)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), RGB)


def test_32_bit_and_float_images():
    ints = np.array([[0, 1000, 65535]], dtype=np.int32)  # within 16 bits: scaled as 16-bit
    got = np.asarray(decode_image(_encode(Image.fromarray(ints, "I"), "TIFF")))[..., 0]
    np.testing.assert_array_equal(got, [[0, round(1000 * 255 / 65535), 255]])
    wide = np.array([[-100, 0, 300]], dtype=np.int32)  # outside: stretched from min to max
    got = np.asarray(decode_image(_encode(Image.fromarray(wide, "I"), "TIFF")))[..., 0]
    np.testing.assert_array_equal(got, [[0, round(100 * 255 / 400), 255]])
    unit = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    got = np.asarray(decode_image(_encode(Image.fromarray(unit, "F"), "TIFF")))[..., 0]
    np.testing.assert_array_equal(got, [[0, 64, 255]])


def test_cmyk_greyscale_palette_and_bilevel_become_rgb():
    cmyk = Image.fromarray(RGB).convert("CMYK")  # C = 255 - R ..., K = 0: the inverse is exact
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(cmyk, "TIFF"))), RGB)
    cmyk_jpeg = decode_image(_encode(cmyk, "JPEG", quality=100))
    assert cmyk_jpeg.mode == "RGB" and np.abs(np.asarray(cmyk_jpeg).astype(int) - RGB).mean() < 8
    grey = RGB[..., 0]
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(Image.fromarray(grey)))),
                                  np.repeat(grey[..., None], 3, -1))
    palette = Image.fromarray(RGB).quantize(16)
    want = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(palette))), want)
    bits = Image.fromarray(grey > 127)
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(bits)))[..., 0], np.where(grey > 127, 255, 0))


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(float)[..., None] / 255.0
    return np.vectorize(round)(rgb.astype(float) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def test_transparency_is_composited_over_white():
    alpha = RNG.integers(0, 256, size=RGB.shape[:2], dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = np.dstack([RGB, alpha])
    got = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))
    np.testing.assert_array_equal(got, _over_white(RGB, alpha))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == tuple(RGB[0, 1])
    la = Image.fromarray(np.dstack([RGB[..., 0], alpha]), "LA")
    np.testing.assert_array_equal(np.asarray(decode_image(_encode(la))),
                                  _over_white(np.repeat(RGB[..., :1], 3, -1), alpha))
    # A palette whose index 0 is transparent: those pixels are white, the others their colour.
    index = np.arange(35, dtype=np.uint8).reshape(5, 7) % 3
    pal = Image.fromarray(index, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 200])
    got = np.asarray(decode_image(_encode(pal, transparency=0)))
    colours = np.array([[255, 255, 255], [200, 0, 0], [0, 0, 200]], dtype=np.uint8)
    np.testing.assert_array_equal(got, colours[index])


def test_a_decompression_bomb_is_refused_before_decoding():
    # A 30000 x 30000 greyscale PNG header (900 million pixels) over a few bytes of data.
    bomb = _png(30000, 30000, 8, 0, b"\x00" * 64)
    with pytest.raises(ImageRejected) as exc:
        decode_image(bomb)
    assert str(exc.value) == f"decompression bomb refused: 900,000,000 pixels, over the limit of {MAX_PIXELS:,}"
    assert decode_error_reason(exc.value) == str(exc.value)
    # Under PIL's own limit, the caller's: refused from the header, with its size.
    with pytest.raises(ImageRejected, match=r"decompression bomb refused: 300x200 = 60,000 pixels, over the "
                                            r"limit of 50,000"):
        decode_image(_png(300, 200, 8, 0, b"\x00" * 64), max_pixels=50_000)


def test_bad_inputs_raise_with_one_line_reasons():
    with pytest.raises(ImageRejected, match=r"^empty image \(0 bytes\)$"):
        decode_image(b"")
    with pytest.raises(Exception) as exc:
        decode_image(b"not an image" * 10)
    assert decode_error_reason(exc.value) == "image does not decode: UnidentifiedImageError: cannot identify image file"
    assert decode_error_reason(exc.value, "unreadable image").startswith("unreadable image: UnidentifiedImageError")
    jpeg = _encode(Image.fromarray(RGB), "JPEG")
    with pytest.raises(OSError) as exc:
        decode_image(jpeg[: len(jpeg) // 2])  # truncated: an error, never a half-grey picture
    assert "truncated" in decode_error_reason(exc.value).lower() and "\n" not in decode_error_reason(exc.value)
