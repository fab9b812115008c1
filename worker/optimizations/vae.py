"""A custom VAE or tiny autoencoder (``--vae-path``), e.g. ``madebyollin/taef1`` for FLUX.1."""

from __future__ import annotations

from typing import Any

import torch


class VaeError(ValueError):
    """The VAE cannot serve this pipeline; the message names ``--vae-path``."""


def load_vae(vae_path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """Load a VAE whose class comes from its ``config.json`` (AutoencoderKL, AutoencoderTiny, ...).

    FLUX.2's tiny autoencoder (fal/FLUX.2-Tiny-AutoEncoder) ships its class as remote code and is
    wrapped to serve as a Flux2Pipeline VAE; running a repository's code needs the operator's
    explicit ``--vae-trust-remote-code``.
    """
    from diffusers import AutoModel

    from worker.optimizations.flux2_tiny_vae import is_flux2_tiny_autoencoder, load_flux2_tiny_vae

    try:
        if is_flux2_tiny_autoencoder(vae_path):
            if not trust_remote_code:
                raise VaeError(
                    f"--vae-path {vae_path!r} is FLUX.2's tiny autoencoder, whose class is remote code: "
                    "add --vae-trust-remote-code to run it"
                )
            return load_flux2_tiny_vae(vae_path, dtype)
        return AutoModel.from_pretrained(vae_path, dtype=dtype)
    except (OSError, ValueError) as error:
        if isinstance(error, VaeError):
            raise
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
