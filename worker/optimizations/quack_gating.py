"""FLUX.1's double blocks' feed-forward gating inside the output GEMM's epilogue (``--quack-gating``).

A double block ends its image stream with ``hidden + gate * ff(norm(hidden))``: cuBLAS's GEMM writes the
feed-forward output, and an inductor kernel then reads it with the residual and writes the sum (36 µs a
block on an H100, lease 96). cuBLASLt cannot fold the gate into its epilogue (no device-vector alpha for
bf16 GEMMs, lease 97). quack's CuTe DSL GEMM can: its epilogue is a Python function over the accumulator
(``worker.optimizations.quack_epilogues.gated_residual``), here ``residual + gate * (acc + bias)`` with the
residual read as C. At the image stream's 4,096 rows the gated quack GEMM takes the plain GEMM's time,
442 µs against the worker's 482 µs for GEMM and gating kernel (``bench.quack_check``, lease 99). At the
single blocks' 4,608 rows quack's GEMMs are 8-9% slower than cuBLAS's, so those keep cuBLAS.

- ``fluxgate::gated_linear`` is an op opaque to the compiler. On a CUDA tensor where quack runs it launches
  the gated GEMM, autotuned by quack at its first call of a shape (the warm-up, or the eager run before a
  new signature's CUDA graph is captured). Elsewhere it computes the same sum with torch, the block's own
  operations in the block's order: on the CPU the block's output is diffusers' to the bit.
- ``GatedFeedForwardBlock`` is diffusers' double block with that one change, for a batch of one. A batch
  of several jobs (one gate per job) keeps diffusers' gating.
- Where: one GPU, a resident bf16 transformer with plain linear layers (not fp8), ``--compile``, a Hopper
  GPU, quack installed, and a small trial call at load that succeeds (``quack_unavailable`` says why not;
  the trial call passed on an H100 in leases 115-118).
- On by default since lease 115, with ``--quack-gelu`` (``worker.optimizations.quack_gelu``): alone it was
  0.3% off a step (lease 100: 3.527 against 3.565 s, runs overlapping); the two together took the lossless
  image from 3.550-3.582 to 3.483-3.498 s on one H100 with the runs interleaved (every run of one faster
  than every run without), 3.444 to 3.403-3.410 s on another (lease 116). quack autotunes the gated GEMM's
  shape at its first call and keeps the result in ``--compile-cache-dir`` (``QUACK_CACHE_DIR``): a cold
  start reached its first image in 60.4 s, a warm one in 17.0 s (lease 115; docs/design.md).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from torch import nn

from worker.optimizations.epilogues import plain_linear
from worker.optimizations.trials import trial_failure


def quack_unavailable(device: torch.device) -> str | None:
    """Why quack's gated GEMM cannot run on ``device`` (``None``: it can): Hopper only, where it was measured,
    with ``quack-kernels`` and the CuTe DSL installed, and a trial call that succeeds (``trial_call``)."""
    if device.type != "cuda":
        return "quack's GEMMs need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"quack's gated GEMM was measured on Hopper (sm_90), not sm_{major}{minor}"
    for module in ("quack", "cutlass"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'fluxgate[fa4-attention]')"
    return trial_failure("quack", trial_call, device)


def trial_call(device: torch.device) -> None:
    """One small gated GEMM in quack's default configuration, at the model's width (3,072 outputs): imports
    quack and the CuTe DSL and builds a kernel at load, so a broken install costs the worker the option, not
    its first job."""
    from worker.optimizations.quack_epilogues import gated_residual

    x, weight = (torch.zeros(rows, 256, device=device, dtype=torch.bfloat16) for rows in (256, 3072))
    residual = torch.zeros(256, 3072, device=device, dtype=torch.bfloat16)
    vector = torch.zeros(3072, device=device, dtype=torch.bfloat16)
    out = {"D": torch.empty_like(residual)}
    gated_residual(x, weight.t(), residual, out=out, tuned=False, bias=vector, gate=vector)
    torch.cuda.synchronize(device)


@torch.library.custom_op("fluxgate::gated_linear", mutates_args=())
def gated_linear(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``residual + gate * (x @ weight.T + bias)`` for rows ``x`` (tokens x inputs), ``residual`` (tokens x
    outputs) and one gate per output: quack's gated GEMM on CUDA, torch elsewhere."""
    if x.is_cuda:
        from worker.optimizations.quack_epilogues import gated_residual

        out = torch.empty_like(residual)
        gated_residual(x, weight.t(), residual, out={"D": out}, bias=bias, gate=gate)
        return out
    return residual + gate * F.linear(x, weight, bias)


@gated_linear.register_fake
def _(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(residual)


def gated_feed_forward(
    ff: Any, hidden: torch.Tensor, normed: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``hidden + gate * ff(normed)``, the output projection and its gating in one GEMM for a batch of one."""
    first, out = ff.net[0], ff.net[2]  # diffusers' FeedForward: [GELU (its projection), Dropout, Linear]
    if hidden.shape[0] != 1 or type(out) is not nn.Linear:
        return hidden + gate.unsqueeze(1) * ff(normed)
    inner = first(normed)
    gated = gated_linear(hidden[0], inner[0], out.weight, out.bias, gate[0])
    return gated.unsqueeze(0)


class GatedFeedForwardBlock(FluxTransformerBlock):
    """diffusers' FLUX.1 double block, its image stream's feed-forward gated inside the output GEMM."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attention_outputs = self.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}),
        )
        attn_output, context_attn_output = attention_outputs[:2]

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = gated_feed_forward(self.ff, hidden_states, norm_hidden_states, gate_mlp)
        if len(attention_outputs) == 3:  # IP-Adapter's attention output
            hidden_states = hidden_states + attention_outputs[2]

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = (
            norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        )
        context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def apply_quack_gating(transformer: nn.Module) -> int:
    """Give FLUX.1's double blocks the gated feed-forward forward; returns how many changed.

    Only blocks whose feed-forward output is a plain biased linear layer (not fp8, not hooked); call after
    quantization and before compiling. The blocks keep their parameters and names (only their class
    changes)."""
    changed = 0
    for module in transformer.modules():
        if type(module) is FluxTransformerBlock and plain_linear(module.ff.net[2]):
            module.__class__ = GatedFeedForwardBlock
            changed += 1
    return changed
