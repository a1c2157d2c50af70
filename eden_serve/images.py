"""Image bytes <-> uint8 arrays, with the checks a server needs before it decodes anything."""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile

from .protocol import RAW_FRAME_CONTENT_TYPE

ACCEPTED_FORMATS = ("PNG", "JPEG")
RAW_MAGIC = b"EDENRGB1"  # raw frames: magic, height and width as uint32 little-endian, then H*W*3 bytes of RGB
RAW_HEADER = struct.Struct("<8sII")
RAW_CONTENT_TYPE = RAW_FRAME_CONTENT_TYPE  # eden_serve/protocol.py


class ImageError(ValueError):
    """Bytes that are not an acceptable image; the message says what is wrong."""


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, name: str = "image") -> np.ndarray:
    """PNG/JPEG (or raw, see ``encode_raw``) bytes -> [H, W, 3] uint8 RGB. Grey, palette and alpha images are
    converted (alpha is dropped); 16-bit images keep their top 8 bits. The size is checked from the header before
    the pixels are decoded."""
    if not data:
        raise ImageError(f"{name}: empty body")
    if is_raw(data):
        return decode_raw(data, max_pixels, min_side, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own limit, before ours
        size = _png_size(data)
        what = f"{size[0]}x{size[1]} is {size[0] * size[1]} pixels" if size else \
            f"it declares more than {Image.MAX_IMAGE_PIXELS} pixels"
        raise ImageError(f"{name}: {what}, over the limit of {max_pixels}") from None
    except Exception as e:
        raise ImageError(f"{name}: not a PNG or JPEG image ({type(e).__name__})") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError(f"{name}: image format {img.format} is not accepted (send PNG or JPEG)")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels}")
    if min(w, h) < min_side:
        raise ImageError(f"{name}: {w}x{h} is too small (each side must be at least {min_side} pixels)")
    try:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = (np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))
    except Exception as e:
        raise ImageError(f"{name}: the image data is damaged or truncated ({type(e).__name__}: {e})") from None


def _png_size(data) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, without decoding anything; None if it is not a PNG."""
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n" or bytes(data[12:16]) != b"IHDR" or len(data) < 24:
        return None
    return struct.unpack(">II", bytes(data[16:24]))


# Pillow hands its PNG encoder 64 KB at a time, taking the interpreter lock again for each; with several threads
# encoding frames (the client's ParallelWriter) those hand-overs queue. 8 MB: a 1080p frame in one or two calls.
ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, 8 << 20)


def encode_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (fast compression: the frame is the hot path's output)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_raw(rgb: np.ndarray) -> list:
    """[H, W, 3] uint8 -> [header, pixels] buffers of a raw frame (no compression: for same-host transport)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8, got {rgb.shape}")
    return [RAW_HEADER.pack(RAW_MAGIC, rgb.shape[0], rgb.shape[1]), memoryview(rgb).cast("B")]


def decode_raw(data, max_pixels: int, min_side: int = 1, name: str = "image") -> np.ndarray:
    """Raw frame bytes -> [H, W, 3] uint8 (a read-only view of ``data``, no copy)."""
    h, w = raw_size(bytes(data[:RAW_HEADER.size]), len(data), max_pixels, min_side, name)
    return np.frombuffer(data, np.uint8, offset=RAW_HEADER.size).reshape(h, w, 3)


def is_raw(head) -> bool:
    return bytes(head[:len(RAW_MAGIC)]) == RAW_MAGIC


def raw_size(head: bytes, nbytes: int, max_pixels: int, min_side: int = 1, name: str = "image") -> tuple[int, int]:
    """(height, width) of a raw frame of ``nbytes`` bytes in all from its header ``head``, checked against the
    limits and the length before any pixel is read."""
    if nbytes < RAW_HEADER.size or len(head) < RAW_HEADER.size:
        raise ImageError(f"{name}: raw frame shorter than its {RAW_HEADER.size}-byte header")
    _, h, w = RAW_HEADER.unpack_from(head)
    if h * w > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels}")
    if min(h, w) < min_side:
        raise ImageError(f"{name}: {w}x{h} is too small (each side must be at least {min_side} pixels)")
    if nbytes != RAW_HEADER.size + h * w * 3:
        raise ImageError(f"{name}: raw {w}x{h} frame needs {h * w * 3} pixel bytes, got {nbytes - RAW_HEADER.size}")
    return h, w
