"""FLUX.1's attention in fp8 (``--attention-fp8``): the fused query/key kernel writes e4m3, cuDNN attends.

The query and key leave ``fluxgate::qk_norm_rope`` already in e4m3, on a scale their norms' weights fix: an
RMSNorm's output has ``sum(x_i^2) <= head_dim`` in each head, so no element exceeds
``sqrt(head_dim) * max|weight|``, and the rotary embedding only turns pairs of elements, which keeps the
bound; the bound maps to 448. That costs no pass over the data (a scale from the tensor's own maximum takes
two: the maximum, then the rounding), and at FLUX's shape it measured the same error as the tensor's own
maximum on an H100 (``bench.fp8_attention_check``: 41.1 dB both). e4m3's precision is relative, so a
looser scale loses nothing until values fall below its normal range (2^-6 x the bound / 448).

The value takes its own maximum (two fused passes, 0.025 ms at FLUX's shape). The output comes back in
e4m3 on the value's scale (``worker.optimizations.fp8_attention``). Where the double blocks' output
projections are ``--quantize fp8``'s per-row fp8 linears, that e4m3 output goes into their GEMMs as it is,
its one scale repeated for every row: no dequantization and per-row requantization pass, and one rounding
less. Elsewhere (the single blocks, whose ``proj_out`` reads it beside the MLP, and bf16 projections) it is
dequantized, which fuses into the kernel that reads it next.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from worker.optimizations.fp8_attention import E4M3_MAX, default_scale, quantize_per_tensor, sdpa_fp8
from worker.optimizations.fp8_mlp import fp8_project, rowwise_fp8_linear
from worker.optimizations.fused_qkv import Parts, Projections
from worker.optimizations.qk_norm_rope import (
    FusedQKFluxAttnProcessor,
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

    # e4m3 output straight into per-row fp8 output projections (False: dequantized first; for the benchmark)
    project_e4m3 = True
    overlaps = False  # its attention is cuDNN's fp8 kernel, called whole
    attends_query_rows = False  # ...over every row's query

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        overlap: bool = False,
        queries_from: int = 0,
    ) -> Any:
        if queries_from:  # the engine gives the image rows only to the bf16 processors' blocks
            raise ValueError("the fp8 processor attends every row's query")
        direct = self.project_e4m3 and encoder_hidden_states is not None and image_rotary_emb is not None
        direct = direct and attention_mask is None and attn.added_kv_proj_dim is not None
        if not (direct and rowwise_fp8_linear(attn.to_out[0]) and rowwise_fp8_linear(attn.to_add_out)):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        parts = (text_query, query), (text_key, key), (text_value, value)
        out, descale = self.attend_e4m3(attn, *parts, image_rotary_emb)
        text_tokens = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        image_out = attn.to_out[1](e4m3_project(attn.to_out[0], image, descale, hidden_states.dtype))
        return image_out, e4m3_project(attn.to_add_out, text, descale, hidden_states.dtype)

    def attend(self, attn: Any, projections: Projections, rope: Any) -> torch.Tensor:
        query, key, value, _ = projections  # three GEMMs here (fused_qkv leaves this class's alone)
        out, descale = self.attend_e4m3(attn, query, key, value, rope)
        return (out.float() * descale).to(value[1].dtype).flatten(2, 3)

    def attend_e4m3(
        self, attn: Any, query: Parts, key: Parts, value: Parts, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's e4m3 (batch, tokens, heads, head_dim) output and its descale."""
        joint = query[0] is not None
        q_scale, q_descale = weight_bound_scale(attn, "q", joint)
        k_scale, k_descale = weight_bound_scale(attn, "k", joint)
        q8 = normed_rotated(attn, *query, "q", rope, q_scale)
        k8 = normed_rotated(attn, *key, "k", rope, k_scale)
        v8, v_descale = quantize_per_tensor(joined(*value).unflatten(-1, (-1, attn.head_dim)))
        out = sdpa_fp8(q8, k8, v8, q_descale, k_descale, v_descale, default_scale(attn.head_dim))
        return out, v_descale


def e4m3_project(linear: Any, out: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-row fp8 ``linear`` of the attention's e4m3 output, its per-tensor scale given to every row."""
    features = out.flatten(2, 3)
    rows = features.reshape(-1, features.shape[-1])
    scale = descale.reshape(1, 1).expand(rows.shape[0], 1).contiguous()
    return fp8_project(rows, scale, linear, features, dtype)


def apply_fp8_attention(transformer: Any) -> int:
    """Give every FLUX.1 attention the fp8 processor (where the fused one applies); returns how many."""
    return apply_fused_qk_norm_rope(transformer, Fp8FluxAttnProcessor)
