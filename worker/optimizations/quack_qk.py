"""FLUX.1's query and key projections with their per-head RMSNorm and RoPE inside the GEMM (``--quack-qk``).

The fused processor (``worker.optimizations.qk_norm_rope``) projects the query and key with cuBLAS, then a
Triton kernel reads each projection back to norm and rotate it: 3,192 calls of 21 µs an image on an H100
(0.068 s, lease 96). quack's CuTe DSL GEMM can do both in its epilogue, from the fp32 accumulator
(``worker.optimizations.quack_epilogues.normed_rotated``: a prepass sums each head's squares, bias included,
then the weighted norm and the rotation are applied before the store). Timed alone on an H100 (lease 102,
``bench.quack_check --parts rope``), one query's projections with their norm and rotation:

- a single block's 4,608 rows: 146.9 µs (128 x 128 tiles, pingpong, 1 x 2 clusters) against the worker's
  157.8 µs (cuBLAS 126.7 µs and the kernel);
- a double block's 512 text and 4,096 image rows, each GEMM writing its rows of the joint output:
  149.9 µs (192 x 128 tiles) against 154.4 µs;
- the error against fp32 is 0.016 against the worker's 0.037: the norm reads the accumulator, not a bf16
  projection.

- ``fluxgate::projected_qk`` is an op opaque to the compiler. On a CUDA tensor it launches one quack GEMM
  per part (text, image) with the tile configuration measured for its rows; elsewhere it runs the
  worker's math (cuBLAS's projection rounded to bf16, then ``qk_norm_rope``'s reference), so on the CPU the
  processor's output is the fused processor's to the bit.
- ``QuackQKFluxAttnProcessor`` is the fused processor with that one change, for a batch of one, plain
  biased projections, head width 128 and the norms' epsilon 1e-6 (quack's ``HeadRstd``); anything else
  takes the fused processor's path.
- Where: one Hopper GPU, ``--compile``, a resident unsharded transformer, quack installed, and a trial call
  at load that builds the epilogue (``quack_qk_unavailable``).
- Opt-in: in the image (lease 103) the step was 0.4 ms faster (0.1247 against 0.1251 s), within the noise and
  under the kernels' 1 ms; the image is the same (docs/design.md, "``--quack-qk``").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from worker.optimizations.epilogues import plain_linear
from worker.optimizations.fused_qkv import Projections
from worker.optimizations.qk_norm_rope import (
    FusedQKFluxAttnProcessor,
    joined,
    reference,
    weighted_norms_with_one_eps,
)
from worker.optimizations.quack_gating import quack_unavailable
from worker.optimizations.trials import trial_failure

EPS, HEAD_DIM = 1e-6, 128  # the epilogue's: HeadRstd's epsilon, and the head width it was measured at
# (tile rows, tile columns, pingpong, cluster rows, cluster columns), the fastest for each part's rows in
# lease 102; columns of 128 hold whole heads, as the per-head norm needs
TILES = {"rows of 4,608 or more": (128, 128, True, 1, 2), "fewer": (192, 128, True, 1, 2)}


def tile_config(rows: int) -> Any:
    """The quack configuration measured fastest for a part of ``rows`` rows."""
    return hopper_config(*TILES["rows of 4,608 or more" if rows >= 4608 else "fewer"])


def hopper_config(tile_m: int, tile_n: int, pingpong: bool, cluster_m: int, cluster_n: int) -> Any:
    """quack's GEMM configuration for a Hopper GPU with these tiles and clusters (static scheduling)."""
    from quack.gemm_config import GemmConfig

    return GemmConfig(
        tile_m=tile_m,
        tile_n=tile_n,
        pingpong=pingpong,
        cluster_m=cluster_m,
        cluster_n=cluster_n,
        is_dynamic_persistent=False,
        device_capacity=9,
    )


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """quack's (tokens, head_dim) rotation table from FLUX's interleaved cos and sin (each pair's value in
    both of its columns): cos at even columns, sin at odd ones."""
    return torch.stack((cos[:, ::2], sin[:, ::2]), dim=-1).flatten(1).contiguous()


@torch.library.custom_op("fluxgate::projected_qk", mutates_args=())
def projected_qk(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    text_bias: torch.Tensor,
    text_norm: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    image_bias: torch.Tensor,
    image_norm: torch.Tensor,
    table: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """``rope(rms_norm(x @ W.T + bias) * norm)`` per head for the text rows (possibly none), then the image
    rows, each part with its own projection and norm: (text + image tokens, outputs), token-major. The norms'
    weights come repeated once per head (outputs long), the rotation as ``rope_table``'s table."""
    outputs = image_weight.shape[0]
    parts = ((text, text_weight, text_bias, text_norm), (image, image_weight, image_bias, image_norm))
    if image.is_cuda:
        from worker.optimizations.quack_epilogues import normed_rotated

        out, start = image.new_empty(text.shape[0] + image.shape[0], outputs), 0
        for x, weight, bias, norm in parts:
            rows = x.shape[0]
            if rows:
                part = slice(start, start + rows)
                normed_rotated(
                    x,
                    weight.t(),
                    out={"D": out[part]},
                    config=tile_config(rows),
                    tuned=False,
                    table=table[part],
                    head_rstd=head_dim,
                    weight=norm,
                    bias=bias,
                )
            start += rows
        return out
    cos, sin = (table[:, column::2].repeat_interleave(2, dim=-1) for column in (0, 1))
    text, image = (F.linear(x, weight, bias)[None] for x, weight, bias, _ in parts)
    head_norms = text_norm[:head_dim], image_norm[:head_dim]
    joint = reference(text, head_norms[0], image, head_norms[1], cos, sin, EPS, head_dim, None, True)
    return joint.flatten(2)[0]


@projected_qk.register_fake
def _(text: torch.Tensor, *arguments: Any) -> torch.Tensor:
    image, image_weight = arguments[3], arguments[4]  # after the text's weight, bias and norm
    return image.new_empty(text.shape[0] + image.shape[0], image_weight.shape[0])


def quack_qk_unavailable(device: torch.device) -> str | None:
    """Why the projections' epilogue cannot run on ``device`` (``None``: it can): quack's GEMMs run there
    (``quack_gating.quack_unavailable``) and a small projection with the norm and rotation builds."""
    return quack_unavailable(device) or trial_failure("quack's query/key epilogue", trial_call, device)


def trial_call(device: torch.device) -> None:
    """One small projection with its norm and rotation, at the model's width: builds the epilogue at load."""
    zeros = torch.zeros(256, 3072, device=device, dtype=torch.bfloat16)
    weight, vector = torch.zeros(3072, 3072, device=device, dtype=torch.bfloat16), zeros[0]
    table = torch.zeros(256, HEAD_DIM, device=device)
    projected_qk(zeros[:0], weight, vector, vector, zeros, weight, vector, vector, table, HEAD_DIM)
    torch.cuda.synchronize(device)


def projects_in_epilogue(attn: Any, hidden_states: torch.Tensor, text: Any) -> bool:
    """The call the epilogue covers: a batch of one, plain biased query/key projections of the measured head
    width, weighted norms with quack's epsilon."""
    linears = [attn.to_q, attn.to_k] + ([attn.add_q_proj, attn.add_k_proj] if text is not None else [])
    return (
        hidden_states.shape[0] == 1
        and attn.head_dim == HEAD_DIM
        and not attn.fused_projections
        and all(plain_linear(linear) and linear.bias is not None for linear in linears)
        and weighted_norms_with_one_eps(attn)
        and attn.norm_q.eps == EPS
        and hasattr(attn, "quack_norm_q")  # apply_quack_qk's repeated weights
    )


class QuackQKFluxAttnProcessor(FusedQKFluxAttnProcessor):
    """The fused processor, its query and key projected, normed and rotated in quack's GEMM epilogue.

    Where the epilogue applies (``projects_in_epilogue``), ``_projections`` hands the query's and key's
    inputs on unprojected and ``_inputs`` makes them with ``projected_qk``; elsewhere both are the fused
    processor's."""

    def _in_epilogue(self, attn: Any, hidden_states: torch.Tensor, text: Any) -> bool:
        """Decided the same way from the block's inputs (``_projections``) and from what it handed on
        (``_inputs``): the batch, whether text tokens come, and the module."""
        return self._parallel_config is None and projects_in_epilogue(attn, hidden_states, text)

    def _projections(self, attn: Any, hidden_states: torch.Tensor, text: Any) -> Projections:
        if not self._in_epilogue(attn, hidden_states, text):
            return super()._projections(attn, hidden_states, text)
        value = (attn.add_v_proj(text) if text is not None else None, attn.to_v(hidden_states))
        return Projections((text, hidden_states), (text, hidden_states), value)

    def _inputs(
        self, attn: Any, projections: Projections, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value, _ = projections
        if not self._in_epilogue(attn, query[1], query[0]):
            return super()._inputs(attn, projections, rope)
        table = rope_table(*rope)  # once for the query and the key
        q, k = (self._projected(attn, *part, which, table) for part, which in ((query, "q"), (key, "k")))
        return q, k, joined(*value).unflatten(-1, (-1, attn.head_dim))

    @staticmethod
    def _projected(
        attn: Any, text: Any, hidden_states: torch.Tensor, which: str, table: torch.Tensor
    ) -> torch.Tensor:
        """(1, tokens, heads, head_dim), token-major: the query ("q") or key ("k"), text tokens first."""
        image_linear = getattr(attn, f"to_{which}")
        text_linear = getattr(attn, f"add_{which}_proj") if text is not None else image_linear
        image_norm = getattr(attn, f"quack_norm_{which}")
        text_norm = getattr(attn, f"quack_norm_added_{which}") if text is not None else image_norm
        image = hidden_states[0]
        joint = projected_qk(
            image[:0] if text is None else text[0],
            text_linear.weight,
            text_linear.bias,
            text_norm,
            image,
            image_linear.weight,
            image_linear.bias,
            image_norm,
            table,
            attn.head_dim,
        )
        return joint.unflatten(-1, (-1, attn.head_dim))[None]


def apply_quack_qk(transformer: Any) -> int:
    """Give the fused processors the quack epilogue's projections; returns how many changed (only fused
    processors without a sequence layout: call on one GPU, after ``apply_fused_qk_norm_rope``).

    Each attention gets its query/key norms' weights repeated once per head (``quack_norm_q`` and the like,
    buffers kept out of the state dict), the vectors the epilogue reads: made here once, not in every step.
    Load-time weights: a later change to a norm's weight (no adapter FLUX.1 loads has one) needs this again.
    """
    changed = 0
    for module in transformer.modules():
        processor: Any = getattr(module, "processor", None)
        if type(processor) is FusedQKFluxAttnProcessor and processor._parallel_config is None:
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                weight = getattr(getattr(module, name, None), "weight", None)
                if weight is not None:
                    repeated = weight.detach().repeat(module.to_q.out_features // weight.numel())
                    module.register_buffer(f"quack_{name}", repeated, persistent=False)
            processor.__class__ = QuackQKFluxAttnProcessor
            changed += 1
    return changed
