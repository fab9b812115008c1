"""Image encoding for results.

JPEG goes through libjpeg-turbo by ``simplejpeg``, which releases the GIL for the whole encoding; Pillow's
encoder takes it back between chunks of output. A worker ends its jobs on background threads while the
next job starts (``worker.endings``), and on lease 72's H100 host the next claim, a handful of Redis round
trips, took 16-57 ms (4-5 ms before) behind four 1024x1024 JPEGs being encoded: each time the main thread
comes back from the network it waits for the GIL. On this 2-core machine a thread spinning beside an
encoding thread kept 85-97% of its pace with simplejpeg, 46-68% with Pillow. The settings are Pillow's
defaults for the same ``quality``: 4:2:0 chroma subsampling, baseline, no metadata.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """PNG (lossless, ``quality`` unused), JPEG or WebP at ``quality``; deterministic for equal pixels."""
    if output_format == "jpeg":
        pixels = np.ascontiguousarray(image.convert("RGB"))
        encoded = simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420")
        return bytes(encoded)
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unsupported output_format {output_format!r}")
    return buffer.getvalue()
