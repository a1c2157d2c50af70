"""Image decoding with the server's checks."""
import io

import numpy as np
import pytest
from PIL import Image

from eden_serve.images import ImageError, decode_image, encode_png


def encoded(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16"])
def test_modes_become_rgb(mode):
    img = Image.fromarray(RGB).convert(mode) if mode != "I;16" else Image.fromarray(
        RGB[..., 0].astype(np.uint16) * 257)
    out = decode_image(encoded(img), max_pixels=10**6)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    if mode == "RGB":
        assert np.array_equal(out, RGB)
    if mode == "I;16":
        assert np.array_equal(out[..., 1], RGB[..., 0])


def test_jpeg_and_png_round_trip():
    assert decode_image(encoded(Image.fromarray(RGB), "JPEG"), 10**6).shape == (40, 60, 3)
    assert np.array_equal(decode_image(encode_png(RGB), 10**6), RGB)


@pytest.mark.parametrize("data, limit, message", [
    (b"", 10**6, "empty body"),
    (b"hello world", 10**6, "not a PNG or JPEG"),
    (encoded(Image.fromarray(RGB))[:100], 10**6, "damaged or truncated"),
    (encoded(Image.fromarray(RGB), "BMP"), 10**6, "format BMP is not accepted"),
    (encoded(Image.fromarray(RGB)), 1000, "60x40 is 2400 pixels, over the limit of 1000"),
    (encoded(Image.new("RGB", (1, 1))), 10**6, "too small"),
])
def test_bad_images(data, limit, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, limit, min_side=32)
