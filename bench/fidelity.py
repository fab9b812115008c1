"""How far a variant's output is from a reference image of the same weights, prompt and seed.

The benchmark generates the reference once per process (bf16, eager, no cache) and compares each
variant's image to it: PSNR and max/mean absolute difference of the final uint8 pixels, and the
max and relative RMS difference of the float tensors on either side of the VAE decoder (the final
latents, and the decoded image in [-1, 1]), captured by wrapping ``vae.decode`` for that one call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.schemas import GenerationParams

REFERENCE = "bf16, eager, no cache; same weights, prompt and seed"


@dataclass(frozen=True)
class Capture:
    """One generation's final image and the float tensors around the VAE decoder (on the CPU)."""

    image: np.ndarray
    latents: torch.Tensor
    decoded: torch.Tensor


@contextlib.contextmanager
def decoder_tap(pipe: Any) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(latents, decoded)`` for every ``pipe.vae.decode`` call made inside the block."""
    vae, calls = pipe.vae, []
    original = vae.decode

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = original(latents, *args, **kwargs)
        decoded = output[0] if isinstance(output, tuple) else output.sample
        calls.append((latents.detach().float().cpu(), decoded.detach().float().cpu()))
        return output

    vae.decode = decode
    try:
        yield calls
    finally:
        del vae.decode  # the instance attribute goes; the class's method is back


def capture(engine: Any, params: GenerationParams) -> Capture:
    """Generate ``params`` (one image) with ``engine`` and keep what the comparison needs."""
    with decoder_tap(engine.pipeline) as calls:
        output = engine.generate(params, lambda step, total: None)
    latents, decoded = calls[-1]
    return Capture(np.asarray(output.images[0].convert("RGB")), latents, decoded)


def difference(reference: Capture, other: Capture) -> dict[str, Any]:
    """PSNR (dB; None when identical) and absolute differences of ``other`` against ``reference``."""
    pixels = np.abs(reference.image.astype(np.float64) - other.image.astype(np.float64))
    mse = float((pixels**2).mean())
    return {
        "reference": REFERENCE,
        "image_psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None,
        "image_max_abs_diff": int(pixels.max()),
        "image_mean_abs_diff": round(float(pixels.mean()), 3),
        "latents_max_abs_diff": round(float((reference.latents - other.latents).abs().max()), 5),
        "latents_rel_rms": round(relative_rms(reference.latents, other.latents), 5),
        "decoded_max_abs_diff": round(float((reference.decoded - other.decoded).abs().max()), 5),
    }


def relative_rms(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference||."""
    return float((other - reference).norm() / reference.norm().clamp_min(1e-12))


def weights_fingerprint(module: torch.nn.Module) -> float:
    """A cheap checksum of a module's first and last parameters: equal builds give equal values."""
    parameters = list(module.parameters())
    with torch.no_grad():
        return float(sum(p.detach().float().sum() for p in (*parameters[:3], parameters[-1])))
