"""The one pixel limit, checked from an image's header before anything decodes it.

``validate.max_pixels`` (default ``DEFAULT_MAX_PIXELS``, Pillow's own bomb threshold) bounds the
memory any step spends on one image: a 388 KB PNG can declare 20000x20000 pixels and cost
gigabytes once decoded. The data gate, the import, the HTML report, the ONNX predictor and the
MLflow pyfunc all call ``check_image_bytes`` / ``check_image_file`` first; the predictor gets the
limit from the ONNX metadata (``damage.max_pixels``, written at export) or its argument.

Standard library only (Pillow is imported lazily for formats other than PNG/JPEG), so the
torch-free predictor can use it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

from .errors import DamageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's MAX_IMAGE_PIXELS: ~13400x13400
HEADER_BYTES = 1 << 20  # JPEG headers may sit behind large EXIF/ICC segments


class ImageTooLarge(DamageError):
    """An image declares more pixels than the configured limit (refused before decoding)."""


def _png_header(data: bytes) -> tuple[int, int, int] | None:
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(data[25], 0)
    return w, h, channels


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """Walk JPEG marker segments up to the first SOF (frame header) without decoding."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / start of scan before any frame header
            return None
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF:
            if i + 10 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h, data[i + 9]
        i += 2 + seg_len
    return None


def image_header(data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, channels) from the header only; raises ValueError if not an image."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        hdr = _png_header(data)
        if hdr is None:
            raise ValueError("PNG without a valid IHDR header")
        return ("png", *hdr)
    if data[:3] == b"\xff\xd8\xff":
        hdr = _jpeg_header(data)
        if hdr is None:
            raise ValueError("JPEG without a frame header (SOF)")
        return ("jpeg", *hdr)
    from PIL import Image  # other formats: Pillow reads just the header until .load()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return ((im.format or "unknown").lower(), w, h, len(im.getbands()))
        except Image.DecompressionBombError as e:
            raise ValueError(f"refused by Pillow's decompression-bomb guard: {e}") from None
        except Exception:
            raise ValueError("not an image (unrecognised format)") from None




def pixel_problem(w: int, h: int, max_pixels: int) -> str | None:
    """Why an image of ``w`` x ``h`` (from its header) must not be decoded, or None: the one pixel-limit rule."""
    if w <= 0 or h <= 0:
        return f"invalid image size {w}x{h} in the header"
    if w * h > max_pixels:
        return f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (not decoded)"
    return None


def check_pixels(w: int, h: int, max_pixels: int, name: str) -> None:
    """Raise ``ImageTooLarge`` (or ``DamageError`` for a nonsensical size) naming ``name`` (``pixel_problem``)."""
    problem = pixel_problem(w, h, max_pixels)
    if problem is not None:
        raise (ImageTooLarge if w > 0 and h > 0 else DamageError)(f"{name}: {problem}")


def check_image_bytes(data: bytes, max_pixels: int, name: str) -> tuple[int, int]:
    """(width, height) from the header of an encoded image; refuses it above ``max_pixels``.

    Raises:
        ImageTooLarge: too many pixels. DamageError: not a recognisable image.
    """
    try:
        _, w, h, _ = image_header(data)
    except ValueError as e:
        raise DamageError(f"{name}: not a readable image ({e})") from None
    check_pixels(w, h, max_pixels, name)
    return w, h


def check_image_file(path: str | os.PathLike, max_pixels: int) -> tuple[int, int]:
    """``check_image_bytes`` on the first ``HEADER_BYTES`` of a file (the rest is not read)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    return check_image_bytes(head, max_pixels, str(path))
