"""Result encoding (worker.encode)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from worker.encode import encode_image


def noise(size: int = 256, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_jpeg_decodes_to_the_image_within_its_quality_like_pillows_own() -> None:
    image = noise()
    jpeg = Image.open(io.BytesIO(encode_image(image, "jpeg", 90)))
    assert jpeg.format == "JPEG" and jpeg.size == image.size and jpeg.mode == "RGB"
    pillow = io.BytesIO()
    image.save(pillow, format="JPEG", quality=90)
    ours = np.asarray(jpeg, dtype=np.float64) - np.asarray(image, dtype=np.float64)
    theirs = np.asarray(Image.open(pillow), dtype=np.float64) - np.asarray(image, dtype=np.float64)
    assert abs(np.sqrt((ours**2).mean()) - np.sqrt((theirs**2).mean())) < 1.0  # the same error, in levels


def test_a_lower_quality_gives_a_smaller_jpeg_and_equal_pixels_the_same_bytes() -> None:
    image = noise()
    assert len(encode_image(image, "jpeg", 50)) < len(encode_image(image, "jpeg", 95))
    assert encode_image(image, "jpeg", 80) == encode_image(noise(), "jpeg", 80)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_jpeg_takes_images_of_other_modes_as_rgb(mode: str) -> None:
    jpeg = Image.open(io.BytesIO(encode_image(noise().convert(mode), "jpeg", 90)))
    assert jpeg.mode == "RGB"


def test_png_and_webp_round_trip_and_unknown_formats_are_refused() -> None:
    image = noise(64)
    png = Image.open(io.BytesIO(encode_image(image, "png", 90)))
    assert np.array_equal(np.asarray(png), np.asarray(image))
    assert Image.open(io.BytesIO(encode_image(image, "webp", 90))).format == "WEBP"
    with pytest.raises(ValueError, match="unsupported output_format 'gif'"):
        encode_image(image, "gif", 90)
