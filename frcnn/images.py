"""The one way an encoded image (JPEG, PNG, TIFF... bytes) becomes the RGB picture the detector sees.

    image = decode_image(data)          # PIL ``RGB`` image, in the frame a viewer shows
    reason = decode_error_reason(exc)   # one line for a report, for anything decode_image raised

Precompute, evaluate, infer and the registered pyfunc all decode through :func:`decode_image`, so
a model sees at inference exactly what it was trained on, and boxes everywhere are in one frame:

- **Orientation**: the EXIF (or XMP) Orientation tag is applied, so width, height and boxes are
  those of the image as a viewer shows it (a phone photo stored sideways comes out upright).
- **Bit depth**: 16-bit images (``I;16*``) are scaled to 8 bits over their full range
  (``round(v * 255 / 65535)``), not clipped; 32-bit integer images (``I``) likewise when their
  values lie in 0..65535, else stretched from their minimum to their maximum; float images
  (``F``) by 255 when their values lie in [0, 1], else stretched the same way.
- **Colour**: greyscale, bilevel, palette, CMYK and YCbCr become RGB (PIL's conversions);
  transparency (``RGBA``, ``LA``, ``PA``, a palette's transparent index) is composited over white,
  as a viewer shows it on a page.
- **Decompression bombs**: an image whose header declares more than ``max_pixels`` pixels is
  refused (:class:`ImageRejected`) before any pixel is decoded (PIL's own check refuses anything
  over :data:`MAX_PIXELS` whatever ``max_pixels`` says).
- A truncated or corrupt file raises (PIL's ``LOAD_TRUNCATED_IMAGES`` is left off), never
  returns a partly grey image. Multi-frame files give their first frame.

Pure PIL and numpy: the registered model bundles only the ``frcnn`` package.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["MAX_PIXELS", "ImageRejected", "decode_error_reason", "decode_image", "to_rgb"]

# PIL's own refusal threshold (twice ``Image.MAX_IMAGE_PIXELS``): about 13400 x 13400, above the
# largest phone and most medium-format sensors.
MAX_PIXELS = 178_956_970

# PIL warns from half that size on; the limit above is the decision, so the warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_PIXELS = re.compile(r"\((\d+) pixels\)")
_BYTESIO = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = 255


class ImageRejected(ValueError):
    """An image refused before decoding; ``str(exc)`` is the reason."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> a fully loaded PIL ``RGB`` image, upright, 8 bits per channel.

    Raises :class:`ImageRejected` for an empty input or one over ``max_pixels`` pixels, and
    whatever PIL raises for a file it cannot decode (see :func:`decode_error_reason`)."""
    if not data:
        raise ImageRejected("empty image (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over PIL's own limit (its check runs inside open)
        found = _PIXELS.search(str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else str(exc)
        raise ImageRejected(f"decompression bomb refused: {size}, over the limit of {MAX_PIXELS:,}") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageRejected(f"decompression bomb refused: {image.width}x{image.height} = {pixels:,} pixels, "
                            f"over the limit of {max_pixels:,}")
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> ``RGB``: high bit depths scaled, transparency over white (module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[..., 3:]
        # round(c * a / 255 + 255 * (1 - a / 255)); the exact value is never halfway (255 is odd)
        rgb = (rgba[..., :3] * alpha + _WHITE * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """A single-channel integer or float array -> uint8, by the rule in the module docstring."""
    if values.dtype.kind in "iu":
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 65535:
            return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    else:
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(values * 255.0).astype(np.uint8)
    span = float(hi - lo) or 1.0
    return np.rint((values.astype(np.float64) - lo) * (255.0 / span)).astype(np.uint8)


def decode_error_reason(exc: BaseException, prefix: str = "image does not decode") -> str:
    """The one-line reason for a failed :func:`decode_image`: a refusal's own reason, or
    ``"<prefix>: <error type>: <message>"`` for the decoder's error (PIL's name for an in-memory
    file removed: noise in a report)."""
    if isinstance(exc, ImageRejected):
        return str(exc)
    text = _BYTESIO.sub("", str(exc)).strip()
    return f"{prefix}: {type(exc).__name__}: {text}".rstrip(": ")
