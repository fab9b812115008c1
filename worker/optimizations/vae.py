"""A custom VAE or tiny autoencoder (``--vae-path``), e.g. ``madebyollin/taef1`` for FLUX.1."""

from __future__ import annotations

from typing import Any

import torch


class VaeError(ValueError):
    """The VAE cannot serve this pipeline; the message names ``--vae-path``."""


def load_vae(vae_path: str, dtype: torch.dtype) -> Any:
    """Load a VAE whose class comes from its ``config.json`` (AutoencoderKL, AutoencoderTiny, ...)."""
    from diffusers import AutoModel

    try:
        return AutoModel.from_pretrained(vae_path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise VaeError(f"--vae-path {vae_path!r} could not be loaded: {error}") from error


def check_vae_fits(pipe: Any, vae_path: str) -> None:
    """The VAE's latent channels must match what the transformer consumes (2x2 packed for FLUX)."""
    latent_channels = int(pipe.vae.config.latent_channels)
    in_channels = int(pipe.transformer.config.in_channels)
    if latent_channels * 4 != in_channels:
        raise VaeError(
            f"--vae-path {vae_path!r} has {latent_channels} latent channels, but the transformer takes "
            f"{in_channels} packed channels ({in_channels // 4} latent channels)"
        )


def apply_vae_tiling(pipe: Any) -> None:
    """Decode large images tile by tile (bounded memory, slower)."""
    if hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
