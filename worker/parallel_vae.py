"""A group's VAE decode split over its ranks (``--parallel-vae``): cache-dit's tiled decode, tiles sized
per call.

cache-dit replaces the VAE's ``tiled_decode`` (``cache_dit/distributed/autoencoders/autoencoder_kl.py``,
``autoencoder_kl_flux2.py``): tile ``k`` is decoded by rank ``k % ranks``, rank 0 blends the tiles into
the image and hands it on to the other ranks. A decode is tiled only when the latent is larger than one
tile, and FLUX's VAE tiles are its 1024 px ``sample_size``, so a 1024x1024 image would not split at all.
Each decode therefore gets the largest tiles that still cut its latent into a 2x2 grid: at 1024x1024 (a
128x128 latent) tiles of 88 latent pixels (704 px) every 66, so with two ranks rank 0 decodes the first
column of tiles (88 of the 128 latent columns, plus the 22-column overlap) and rank 1 the second.

The tiles overlap by a quarter, as diffusers' own tiling, and are blended the same way, so the image is
the one-process tiled decode with these tiles (``split_decode_tiles`` on a plain VAE draws it), not the
untiled one. Encoding (reference images) is left as it was.
"""

from __future__ import annotations

import math
from typing import Any

from worker.parallel import ParallelError

SUPPORTED_VAES = ("AutoencoderKL", "AutoencoderKLFlux2")  # cache-dit 1.5.3's planners for FLUX.1 and FLUX.2
OVERLAP = 0.25  # diffusers' tile_overlap_factor: with latent tiles a multiple of 4 the blended rows add up
TILING = ("use_tiling", "tile_latent_min_size", "tile_sample_min_size", "tile_overlap_factor")


def check_parallel_vae(vae: Any) -> None:
    """cache-dit splits the decode of the VAEs it has a planner for; refuse others at start."""
    name = type(vae).__name__
    if name not in SUPPORTED_VAES:
        raise ParallelError(
            f"--parallel-vae splits the decode of {' and '.join(SUPPORTED_VAES)} (cache-dit's planners); "
            f"this pipeline's VAE is {name} (a --vae-path?): drop --parallel-vae or the custom VAE"
        )


def split_tile(latent_side: int) -> int:
    """The latent tile whose 2x2 grid covers ``latent_side``: a multiple of 4 (so a quarter's overlap is
    whole) whose stride, three quarters of it, reaches half the side."""
    return 4 * math.ceil(latent_side / 6)


def split_decode_tiles(vae: Any, encode_tiling: bool) -> None:
    """Size the tiles of every decode for a 2x2 split, restoring the VAE's own tiling afterwards.

    ``encode_tiling``: whether tiling was on before cache-dit's planner turned it on (``--vae-tiling``);
    it is put back, so reference images encode as before.
    """
    vae.use_tiling = encode_tiling
    original = vae._decode
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8: latent to image pixels

    def decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        saved = {name: getattr(vae, name) for name in TILING}
        tile = split_tile(max(z.shape[-2:]))
        values = (True, tile, tile * scale, OVERLAP)
        for name, value in zip(TILING, values, strict=True):
            setattr(vae, name, value)
        try:
            return original(z, *args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(vae, name, value)

    vae._decode = decode
