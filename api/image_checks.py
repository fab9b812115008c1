"""Decoding untrusted reference images safely, and normalizing them to RGB PNGs.

Rules (``shared.settings.Limits``), each a 400 naming the field:

- at most ``max_reference_image_bytes`` encoded bytes;
- PNG, JPEG, WebP or GIF only (only those decoders are tried);
- at most ``max_reference_image_pixels``, read from the header *before* any pixel is decoded, so a
  decompression bomb (a small file declaring a huge canvas) costs nothing; Pillow's own
  ``MAX_IMAGE_PIXELS`` guard stays on behind it;
- sides of at least ``min_reference_image_side`` and an aspect ratio of at most
  ``max_reference_image_aspect_ratio`` (FLUX.2's own checks, so they fail here and not in a job);
- modes: 1, L, P, RGB, CMYK, YCbCr and their alpha forms become RGB (transparent areas composited on
  white); 16-bit and float modes (``I;16``, ``I``, ``F``) and LAB/HSV are refused rather than clipped;
- animated images: the first frame; EXIF orientation is applied.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ApiError, invalid
from shared.settings import Limits

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
OPAQUE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
WHITE = (255, 255, 255, 255)
# PNG compression level: references are internal and read once, so speed beats size.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class DecodedImage:
    """A checked reference image as an RGB PNG, and the sha256 of the bytes it came from."""

    data: bytes
    width: int
    height: int
    sha256: str
    source_sha256: str


def decode_image(raw: bytes, label: str, param: str, limits: Limits) -> DecodedImage:
    """Check and normalize one encoded image; every problem is a 400 naming ``param``."""
    if len(raw) > limits.max_reference_image_bytes:
        raise invalid(
            param, f"{label} is larger than {limits.max_reference_image_bytes} bytes.", "image_too_large"
        )
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as image:
            # Size and mode come from the header: nothing is decoded before both are checked.
            _check_pixels(image.size, label, param, limits)
            _check_mode(image, label, param)
            rgb = _to_rgb(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise invalid(param, f"{label} is not a PNG, JPEG, WebP or GIF image.", "invalid_image") from None
    except Image.DecompressionBombError:  # Pillow's own guard, behind ours
        raise _too_many_pixels(label, param, limits) from None
    except Exception as error:  # any decoder failure on untrusted bytes (corrupt data, bad EXIF, ...)
        raise invalid(param, f"{label} could not be decoded ({error}).", "invalid_image") from None
    _check_shape(rgb.size, label, param, limits)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    data = buffer.getvalue()
    return DecodedImage(
        data=data,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(data).hexdigest(),
        source_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _check_pixels(size: tuple[int, int], label: str, param: str, limits: Limits) -> None:
    width, height = size
    if width <= 0 or height <= 0 or width * height > limits.max_reference_image_pixels:
        raise _too_many_pixels(label, param, limits)


def _too_many_pixels(label: str, param: str, limits: Limits) -> ApiError:
    return invalid(
        param, f"{label} has more than {limits.max_reference_image_pixels} pixels.", "image_too_large"
    )


def _check_shape(size: tuple[int, int], label: str, param: str, limits: Limits) -> None:
    width, height = size
    if min(width, height) < limits.min_reference_image_side:
        raise invalid(
            param,
            f"{label} is {width}x{height}; both sides must be at least {limits.min_reference_image_side} px.",
            "image_too_small",
        )
    if max(width, height) / min(width, height) > limits.max_reference_image_aspect_ratio:
        raise invalid(
            param,
            f"{label} is {width}x{height}; its aspect ratio must be at most "
            f"{limits.max_reference_image_aspect_ratio:g}:1.",
            "invalid_image",
        )


def _check_mode(image: Image.Image, label: str, param: str) -> None:
    if image.mode not in OPAQUE_MODES | ALPHA_MODES:
        raise invalid(
            param,
            f"{label} has the unsupported pixel mode {image.mode}; "
            "send an 8-bit RGB, RGBA or grayscale image.",
            "unsupported_image_mode",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame, apply the EXIF orientation, convert to RGB (transparency on white)."""
    image = ImageOps.exif_transpose(image)  # decodes; returns a copy when there is nothing to turn
    mode = image.mode
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return image.convert("RGB")
