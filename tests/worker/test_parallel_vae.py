"""The decode split's tiles (``--parallel-vae``): sized per call for a 2x2 grid, the image's own size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.parallel import ParallelError
from worker.parallel_vae import check_parallel_vae, split_decode_tiles, split_tile
from worker.tiny_flux2 import build_tiny_flux2_pipeline
from worker.tiny_model import build_tiny_pipeline


def test_tiles_cut_a_latent_into_a_2x2_grid_with_whole_quarter_overlaps() -> None:
    for side in (16, 63, 96, 128, 256):
        tile = split_tile(side)
        stride = tile * 3 // 4
        assert tile % 4 == 0 and tile < side and len(range(0, side, stride)) == 2, side
    assert split_tile(128) == 88  # 1024x1024: 704 px tiles every 528 px


@pytest.mark.parametrize("kind", ["flux1", "flux2"])
def test_a_split_decode_runs_four_tiles_and_returns_the_images_size(kind: str) -> None:
    vae = build_tiny_pipeline("flux1").vae if kind == "flux1" else build_tiny_flux2_pipeline().vae
    latent = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = vae.decode(latent).sample
    split_decode_tiles(vae, encode_tiling=False)
    tiles = [0]
    vae.decoder.register_forward_hook(lambda *_: tiles.__setitem__(0, tiles[0] + 1))
    with torch.inference_mode():
        tiled = vae.decode(latent).sample
    assert tiles[0] == 4 and tiled.shape == whole.shape
    assert vae.use_tiling is False  # encoding is left as it was
    small = torch.randn(1, vae.config.latent_channels, 8, 8)
    tiles[0] = 0
    with torch.inference_mode():
        assert vae.decode(small).sample.shape[-1] == 64
    assert tiles[0] == 1  # too small to split: decoded whole


def test_vaes_without_a_cache_dit_planner_are_refused_naming_the_flag() -> None:
    check_parallel_vae(build_tiny_pipeline("flux1").vae)
    with pytest.raises(ParallelError, match="--parallel-vae splits the decode of AutoencoderKL"):
        check_parallel_vae(SimpleNamespace())
