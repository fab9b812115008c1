"""PNG and JPEG encoding time of one 1024x1024 image through the worker's own encoder, on its own.

    python -m bench.e2e.encode_probe --size 1024

Random weights give noise-like pictures, the worst case for PNG (nothing to compress); a smooth gradient
is the friendly case. Medians of ``--repeats`` encodings, printed as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from PIL import Image

from worker.encode import encode_image

QUALITY = 90  # the API's default output_quality


def timed_encode(image: Image.Image, output_format: str, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` encodings, and the encoded size in bytes."""
    seconds, data = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode_image(image, output_format, QUALITY)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), len(data)


def probe(size: int, repeats: int) -> dict[str, dict[str, float]]:
    gradient = Image.merge(
        "RGB", [Image.linear_gradient("L").resize((size, size)).rotate(angle) for angle in (0, 90, 180)]
    )
    images = {
        f"noise_{size}": Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)),
        f"gradient_{size}": gradient,
    }
    result = {}
    for name, image in images.items():
        png_s, png_bytes = timed_encode(image, "png", repeats)
        jpeg_s, jpeg_bytes = timed_encode(image, "jpeg", repeats)
        result[name] = {
            "png_s": round(png_s, 4),
            "jpeg_s": round(jpeg_s, 4),
            "png_bytes": png_bytes,
            "jpeg_bytes": jpeg_bytes,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.size, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
