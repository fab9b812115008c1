"""Image encoding for results."""

from __future__ import annotations

import io

from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """PNG (lossless, ``quality`` unused), JPEG or WebP at ``quality``; deterministic for equal pixels."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported output_format {output_format!r}")
    return buffer.getvalue()
