"""A small ``AutoencoderKL`` with a mid-block attention (the tiny pipeline's VAE has none), random weights."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
