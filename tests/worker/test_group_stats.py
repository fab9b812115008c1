"""--vae-group-stats: the compiled decoder's GroupNorms take their statistics from fluxgate::group_norm_stats
(a kernel reading whole channels-last pixels on a GPU, torch's var_mean elsewhere); the same output."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from worker.cli import add_worker_arguments, engine_options
from worker.optimizations.group_stats import (
    StatsGroupNorm,
    apply_group_stats,
    group_norm_stats,
    pixels_rows,
)

from .device_support import compiled_engine_vae_decoder
from .vae_support import tiny_vae


def activations(channels: int = 32, side: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(channels + side)
    return (torch.randn(2, channels, side, side + 1, generator=generator) * 3 + 1.5).to(dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_statistics_are_each_groups_mean_and_reciprocal_deviation(channels_last: bool) -> None:
    x = activations()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, rstd = group_norm_stats(x, 8, 1e-6)
    grouped = x.reshape(2, 8, -1).double()
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 8)
    assert torch.allclose(mean.double(), grouped.mean(-1), atol=1e-5)
    assert torch.allclose(rstd.double(), (grouped.var(-1, correction=0) + 1e-6).rsqrt(), rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_the_group_norm_gives_pytorchs_output(affine: bool, dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 32, eps=1e-6, affine=affine).to(dtype)
    if affine:
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    x = activations(dtype=dtype).contiguous(memory_format=torch.channels_last)
    expected = norm(x)
    assert apply_group_stats(nn.Sequential(norm)) == 1 and isinstance(norm, StatsGroupNorm)
    output = norm(x)
    assert output.dtype == dtype and output.shape == x.shape
    assert torch.allclose(output.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_the_kernel_reads_dense_channels_last_tensors_of_power_of_two_groups_only() -> None:
    x = activations(channels=32)
    assert not pixels_rows(x, 8)  # NCHW
    assert pixels_rows(x.contiguous(memory_format=torch.channels_last), 8)
    assert not pixels_rows(activations(channels=24).contiguous(memory_format=torch.channels_last), 8)
    assert not pixels_rows(
        activations(channels=32).contiguous(memory_format=torch.channels_last), 32 // 4 * 3
    )
    assert not pixels_rows(torch.randn(2, 32, 10), 8)  # 3-d
    assert not pixels_rows(x.contiguous(memory_format=torch.channels_last)[:, :, ::2], 8)  # strided pixels


@torch.no_grad()
def test_the_compiled_decoder_traces_the_statistics_in_one_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32, eps=1e-6), nn.SiLU())
    x = torch.randn(1, 16, 8, 8)
    expected = model(x)
    apply_group_stats(model)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(x), expected, atol=1e-5)


@torch.no_grad()
def test_a_vae_decoder_with_the_statistics_decodes_the_same_image() -> None:
    vae = tiny_vae()
    latent = torch.randn(1, 4, 8, 8)
    expected = vae.decode(latent).sample
    assert apply_group_stats(vae.decoder) == sum(isinstance(m, nn.GroupNorm) for m in vae.decoder.modules())
    assert torch.allclose(vae.decode(latent).sample, expected, atol=1e-5)


def test_the_compiled_engine_gives_the_decoder_the_statistics_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    norms = [
        type(m) for m in compiled_engine_vae_decoder(monkeypatch).modules() if isinstance(m, nn.GroupNorm)
    ]
    assert norms and set(norms) == {StatsGroupNorm}
    decoder = compiled_engine_vae_decoder(monkeypatch, vae_group_stats=False)
    assert {type(m) for m in decoder.modules() if isinstance(m, nn.GroupNorm)} == {nn.GroupNorm}
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).vae_group_stats is True
    assert engine_options(parser.parse_args(["--no-vae-group-stats"])).vae_group_stats is False
