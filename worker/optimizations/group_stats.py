"""The compiled VAE decoder's GroupNorm statistics read whole pixels at a time (``--vae-group-stats``).

Inductor runs the compiled decoder channels-last (its convolutions are cuDNN's NHWC kernels), and reduces
each GroupNorm's statistics over a group's channels one channel at a time: a program's loads take one
channel of a pixel from rows of 256-512 bytes, so each 32-byte sector is fetched for 2 of its bytes (an
H200's profile, this session: the 512 x 512 x 256 GroupNorm's first stage takes 0.6 ms for 128 MB, 22x its
traffic's time; the decode's reductions ~7 ms of its 31 ms).

``fluxgate::group_norm_stats`` computes the mean and reciprocal standard deviation of each (batch, group)
with a Triton kernel that reads whole pixels, all channels contiguous: each program takes a run of pixels,
reduces them block by block per group (a block's mean and squared deviations, exact in registers), and
merges the blocks by Chan's formula; a second launch merges the programs. The normalization itself stays
with inductor (``StatsGroupNorm``), fused with the SiLU and residual adds around it as before.

- The op carries the ``flexible_layout`` tag, so inductor hands it the channels-last tensor it has instead
  of copying it to the strides seen when tracing. A tensor whose channels are not innermost and dense, a
  CPU tensor, or an install without Triton gets torch's ``var_mean`` (same statistics).
- Only where the decoder is compiled (``--compile``, ``compile_vae``): the eager decoder keeps PyTorch's
  GroupNorm kernel, which reads NCHW tensors well.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the statistics come from torch
    triton = None

# programs of the first launch: four waves of an H100's 132 SMs
PROGRAMS = 528
# elements a program holds per block of pixels (its pixels times the channels)
BLOCK_ELEMENTS = 8192


@torch.library.custom_op("fluxgate::group_norm_stats", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def group_norm_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and ``1 / sqrt(var + eps)`` of ``x`` (batch, channels, *spatial) over each channel group,
    each (batch, groups) in fp32."""
    if x.is_cuda and triton is not None and pixels_rows(x, groups):
        return _triton_stats(x, groups, eps)
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


@group_norm_stats.register_fake
def _(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], groups)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def pixels_rows(x: torch.Tensor, groups: int) -> bool:
    """Whether the kernel reads ``x``: a 4-d channels-last tensor (each pixel's channels contiguous, the
    pixels dense after each other) with a power-of-two channel count that the groups divide into powers of
    two."""
    if x.dim() != 4 or x.numel() == 0 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    channels = x.shape[1]
    return power_of_two(channels) and channels % groups == 0 and power_of_two(channels // groups)


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class StatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with its statistics from ``fluxgate::group_norm_stats`` and the normalization and
    affine as torch operations, which the compiled decoder fuses with what surrounds them."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        mean, rstd = group_norm_stats(input, self.num_groups, self.eps)
        batch, channels = input.shape[:2]
        shape = (batch, self.num_groups, 1, *([1] * (input.dim() - 2)))
        grouped = input.unflatten(1, (self.num_groups, channels // self.num_groups)).float()
        normed = ((grouped - mean.view(shape)) * rstd.view(shape)).flatten(1, 2)
        if self.affine:
            affine = (1, channels, *([1] * (input.dim() - 2)))
            normed = normed * self.weight.view(affine) + self.bias.view(affine)
        return normed.to(input.dtype)


def apply_group_stats(module: nn.Module) -> int:
    """Give ``module``'s GroupNorms (``nn.GroupNorm`` itself) the statistics kernel; returns how many. Call
    before compiling it: the compiled graph traces the new forward."""
    changed = 0
    for child in module.modules():
        if type(child) is nn.GroupNorm:
            child.__class__ = StatsGroupNorm
            changed += 1
    return changed


if triton is not None:

    @triton.jit
    def _block_stats_kernel(
        x,
        partial_mean,
        partial_m2,
        pixels,
        pixels_per_program,
        CHANNELS: tl.constexpr,
        GROUPS: tl.constexpr,
        BLOCK_PIXELS: tl.constexpr,
    ):
        program = tl.program_id(0)
        batch = tl.program_id(1)
        GROUP_SIZE: tl.constexpr = CHANNELS // GROUPS
        channel = tl.arange(0, CHANNELS)
        start = program * pixels_per_program
        end = tl.minimum(start + pixels_per_program, pixels)
        rows = x + batch.to(tl.int64) * pixels * CHANNELS
        mean = tl.zeros([GROUPS], tl.float32)
        m2 = tl.zeros([GROUPS], tl.float32)
        count = tl.zeros([GROUPS], tl.float32)
        for first in range(start, end, BLOCK_PIXELS):
            pixel = first + tl.arange(0, BLOCK_PIXELS)
            live = pixel < end
            offsets = pixel.to(tl.int64)[:, None] * CHANNELS + channel[None, :]
            values = tl.load(rows + offsets, mask=live[:, None], other=0.0).to(tl.float32)
            values = tl.reshape(values, [BLOCK_PIXELS, GROUPS, GROUP_SIZE])
            taken = tl.sum(live.to(tl.float32), axis=0) * GROUP_SIZE
            block_mean = tl.sum(tl.sum(values, axis=2), axis=0) / taken
            centred = values - block_mean[None, :, None]
            centred = tl.where(live[:, None, None], centred, 0.0)
            block_m2 = tl.sum(tl.sum(centred * centred, axis=2), axis=0)
            total = count + taken
            delta = block_mean - mean
            mean += delta * (taken / total)
            m2 += block_m2 + delta * delta * (count * taken / total)
            count = total
        out = (batch * tl.num_programs(0) + program) * GROUPS + tl.arange(0, GROUPS)
        tl.store(partial_mean + out, mean)
        tl.store(partial_m2 + out, m2)

    @triton.jit
    def _merge_stats_kernel(
        partial_mean,
        partial_m2,
        mean_out,
        rstd_out,
        programs,
        pixels,
        pixels_per_program,
        eps,
        GROUPS: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        BLOCK_PROGRAMS: tl.constexpr,
    ):
        batch = tl.program_id(0)
        group = tl.arange(0, GROUPS)
        mean = tl.zeros([GROUPS], tl.float32)
        m2 = tl.zeros([GROUPS], tl.float32)
        count = tl.zeros([GROUPS], tl.float32)
        for first in range(0, programs, BLOCK_PROGRAMS):
            program = first + tl.arange(0, BLOCK_PROGRAMS)
            live = program < programs
            taken = tl.minimum(pixels_per_program, pixels - program * pixels_per_program) * GROUP_SIZE
            taken = tl.where(live, taken, 0).to(tl.float32)
            at = (batch * programs + program)[:, None] * GROUPS + group[None, :]
            part_mean = tl.load(partial_mean + at, mask=live[:, None], other=0.0)
            part_m2 = tl.load(partial_m2 + at, mask=live[:, None], other=0.0)
            block_count = tl.sum(taken, axis=0)
            block_mean = tl.sum(taken[:, None] * part_mean, axis=0) / block_count
            spread = part_mean - block_mean[None, :]
            block_m2 = tl.sum(part_m2 + taken[:, None] * spread * spread, axis=0)
            total = count + block_count
            delta = block_mean - mean
            mean += delta * (block_count / total)
            m2 += block_m2 + delta * delta * (count * block_count / total)
            count = total
        tl.store(mean_out + batch * GROUPS + group, mean)
        tl.store(rstd_out + batch * GROUPS + group, 1.0 / tl.sqrt(m2 / count + eps))

    def _triton_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels = x.shape[:2]
        pixels = x.numel() // (batch * channels)
        block_pixels = max(1, min(BLOCK_ELEMENTS // channels, triton.next_power_of_2(pixels)))
        per_program = triton.cdiv(triton.cdiv(pixels, PROGRAMS), block_pixels) * block_pixels
        programs = triton.cdiv(pixels, per_program)
        partial = torch.empty((2, batch, programs, groups), device=x.device, dtype=torch.float32)
        _block_stats_kernel[(programs, batch)](
            x,
            partial[0],
            partial[1],
            pixels,
            per_program,
            CHANNELS=channels,
            GROUPS=groups,
            BLOCK_PIXELS=block_pixels,
            num_warps=8,
        )
        mean = torch.empty((batch, groups), device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _merge_stats_kernel[(batch,)](
            partial[0],
            partial[1],
            mean,
            rstd,
            programs,
            pixels,
            per_program,
            eps,
            GROUPS=groups,
            GROUP_SIZE=channels // groups,
            BLOCK_PROGRAMS=128,
        )
        return mean, rstd
