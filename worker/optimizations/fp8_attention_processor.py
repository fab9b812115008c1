"""FLUX.1's attention in fp8 (``--attention-fp8``): the fused query/key kernel writes e4m3, cuDNN attends.

The query and key leave ``fluxgate::qk_norm_rope`` already in e4m3, on a scale their norms' weights fix: an
RMSNorm's output has ``sum(x_i^2) <= head_dim`` in each head, so no element exceeds
``sqrt(head_dim) * max|weight|``, and the rotary embedding only turns pairs of elements, which keeps the
bound; the bound maps to 448. That costs no pass over the data (a scale from the tensor's own maximum takes
two: the maximum, then the rounding), and at FLUX's shape it measured the same error as the tensor's own
maximum on an H100 (``bench.fp8_attention_check``: 41.1 dB both). e4m3's precision is relative, so a
looser scale loses nothing until values fall below its normal range (2^-6 x the bound / 448).

The value takes its own maximum (two fused passes, 0.025 ms at FLUX's shape). The output comes back in
e4m3 on the value's scale (``worker.optimizations.fp8_attention``); its dequantization fuses into the
kernel that reads it next.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from worker.optimizations.fp8_attention import E4M3_MAX, default_scale, quantize_per_tensor, sdpa_fp8
from worker.optimizations.qk_norm_rope import (
    FusedQKFluxAttnProcessor,
    Parts,
    apply_fused_qk_norm_rope,
    joined,
    normed_rotated,
    qk_norms,
)


def weight_bound_scale(attn: Any, which: str, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale), one-element fp32 tensors, for the normed and rotated query ("q") or key ("k")."""
    weights = [norm.weight.detach().abs().amax().float() for norm in qk_norms(attn, which, joint)]
    bound = (torch.stack(weights).amax() * math.sqrt(attn.head_dim)).clamp(min=1e-12)
    return (E4M3_MAX / bound).reshape(1), (bound / E4M3_MAX).reshape(1)


class Fp8FluxAttnProcessor(FusedQKFluxAttnProcessor):
    """The fused processor with e4m3 query, key and value and cuDNN's fp8 attention."""

    def attend(self, attn: Any, query: Parts, key: Parts, value: Parts, rope: Any) -> torch.Tensor:
        joint = query[0] is not None
        q_scale, q_descale = weight_bound_scale(attn, "q", joint)
        k_scale, k_descale = weight_bound_scale(attn, "k", joint)
        q8 = normed_rotated(attn, *query, "q", rope, q_scale)
        k8 = normed_rotated(attn, *key, "k", rope, k_scale)
        v8, v_descale = quantize_per_tensor(joined(*value).unflatten(-1, (-1, attn.head_dim)))
        out = sdpa_fp8(q8, k8, v8, q_descale, k_descale, v_descale, default_scale(attn.head_dim))
        return (out.float() * v_descale).to(value[1].dtype).flatten(2, 3)


def apply_fp8_attention(transformer: Any) -> int:
    """Give every FLUX.1 attention the fp8 processor (where the fused one applies); returns how many."""
    return apply_fused_qk_norm_rope(transformer, Fp8FluxAttnProcessor)
