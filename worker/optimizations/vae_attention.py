"""The compiled VAE decoder's mid-block attention as two GEMMs around a softmax (``--vae-gemm-attention``).

FLUX.1's decoder attends once, in its mid block: one head of width 512 over the latent's 16,384 positions
at 1024 x 1024 (550 GFLOP). No flash kernel takes a head that wide (FlashAttention's and cuDNN's stop at
256), so SDPA runs PyTorch's memory-efficient kernel: 4.6 ms on an H100 (120 TFLOP/s, lease 123), 3.7 ms on
an H200 (lease 127). At this width the scores are cheap to hold (16,384^2 fp32, 1 GiB; a quarter of it per
chunk of queries here) and the two products are large GEMMs at cuBLAS's rate, so ``GemmAttnProcessor``
computes, per chunk of queries:

- the scores ``Q K^T`` as a bf16 GEMM writing fp32 (``torch.bmm(..., out_dtype=torch.float32)`` on CUDA),
- their softmax at SDPA's scale (``1 / sqrt(head width)``) in fp32, rounded to bf16, as flash kernels do
  before their second product,
- ``P V`` as a bf16 GEMM.

The rest of the processor is diffusers' ``AttnProcessor2_0`` for the VAE's case (a 4-d input, no text, no
mask: its group norm, projections, residual and rescale). Anything else goes to diffusers' processor.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

# query rows a chunk: 4,096 x 16,384 scores, 256 MiB in fp32
QUERY_CHUNK = 4096


def gemm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One head's attention, (batch, tokens, width) in and out, as ``softmax(Q K^T / sqrt(width)) V`` through
    two GEMMs, the scores in fp32, ``QUERY_CHUNK`` queries at a time."""
    scale = query.shape[-1] ** -0.5
    keys = key.transpose(1, 2)
    chunks = []
    for start in range(0, query.shape[1], QUERY_CHUNK):
        rows = query[:, start : start + QUERY_CHUNK]
        if rows.is_cuda:
            scores = torch.bmm(rows, keys, out_dtype=torch.float32)
        else:  # CPU matmuls take no output dtype
            scores = torch.bmm(rows.float(), keys.float())
        weights = torch.softmax(scores * scale, dim=-1).to(value.dtype)
        chunks.append(torch.bmm(weights, value))
    return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]


class GemmAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` with a single head's attention through ``gemm_attention``, for the
    VAE's attention (a 4-d input, no text states, no mask, no spatial norm); other calls go to diffusers'."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        plain = encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
        if not (plain and hidden_states.ndim == 4 and attn.heads == 1 and not args and not kwargs):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hidden_states = gemm_attention(query, key, value).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def apply_gemm_attention(module: nn.Module) -> int:
    """Give ``module``'s single-head attentions that run diffusers' ``AttnProcessor2_0`` the GEMM processor;
    returns how many. Call before compiling it."""
    changed = 0
    for child in module.modules():
        if isinstance(child, Attention) and child.heads == 1 and type(child.processor) is AttnProcessor2_0:
            child.set_processor(GemmAttnProcessor())
            changed += 1
    return changed
