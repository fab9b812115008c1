"""FLUX.1's MLP activations inside the GEMMs (``apply_gemm_epilogues``): fewer elementwise passes a step.

On an H100 the regional compile's heaviest elementwise kernels are MLP glue (lease 13, docs/performance.md):
the single blocks' ``cat(attention, gelu(mlp))`` feeding ``proj_out`` (0.12 s an image) and the double
blocks' feed-forward GELU (0.04 s). Both are memory passes over 4608 x 12288 activations that the GEMMs
around them could absorb:

- the tanh GELU runs in cuBLASLt's epilogue of its input projection (``torch._addmm_activation`` with
  ``use_gelu``; inductor keeps the op as an external call, so the epilogue survives compilation);
- the single blocks' ``proj_out`` runs as two GEMMs over its column blocks (attention part, MLP part),
  the second adding into the first's output in place (cuBLAS's beta = 1, ``accumulate_mm``), and the
  gating kernel inductor emits anyway adds the bias: the concatenation is gone.

The GEMMs then round differently than eager's (the GELU sees the fp32 accumulator; ``proj_out``'s first
partial sum is rounded to bf16 before the second is added to it): within bf16 tolerance, measured as an image
PSNR by ``bench.pipeline``. Layers whose weights are not plain tensors (fp8, tensor parallel) or that
carry hooks (streamed offload) keep diffusers' forward; off CUDA the GELU runs unfused (cuBLASLt's
epilogue is CUDA's, and the CPU kernel's GELU is the exact one).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from worker.optimizations.ulysses import PendingAttention


def unhooked_linear(linear: nn.Module) -> TypeGuard[nn.Linear]:
    """An ``nn.Linear`` itself (no subclass or wrapper) with nothing hooked onto its forward."""
    if type(linear) is not nn.Linear:
        return False
    return not (linear._forward_hooks or linear._forward_pre_hooks or "forward" in vars(linear))


def plain_linear(linear: nn.Module) -> bool:
    """A biased ``nn.Linear`` with an ordinary weight tensor and nothing hooked onto its forward."""
    if not unhooked_linear(linear) or linear.bias is None:
        return False
    return not is_traceable_wrapper_subclass(linear.weight)


def gelu_linear(hidden_states: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")``, the GELU in cuBLASLt's epilogue on CUDA.

    A layer swapped in after the epilogues were applied (an adapter wrapping the linear) is called as is.
    """
    if not hidden_states.is_cuda or type(linear) is not nn.Linear:
        return F.gelu(linear(hidden_states), approximate="tanh")
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch._addmm_activation(linear.bias, flat, linear.weight.t(), use_gelu=True)
    return out.view(*hidden_states.shape[:-1], out.shape[-1])


class EpilogueGELU(GELU):
    """diffusers' ``GELU`` (a projection, then the activation) as one GEMM with a GELU epilogue."""

    # the projection and GELU (``--quack-gelu``'s subclass takes quack's GEMM), as the single block's;
    # not ``gelu``, diffusers' method of the activation alone
    projected_gelu = staticmethod(gelu_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projected_gelu(hidden_states, self.proj)


def settled(attn_output: Any) -> torch.Tensor:
    """The attention's output, waited for where cache-dit's async Ulysses returned a pending exchange."""
    output = attn_output
    if not isinstance(output, torch.Tensor):
        output = output.wait() if hasattr(output, "wait") else output()
    return output.flatten(2, 3) if output.ndim == 4 else output


@torch.library.custom_op("fluxgate::accumulate_mm", mutates_args=("accumulator",))
def accumulate_mm(accumulator: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    """``accumulator += mat1 @ mat2`` in place: the GEMM reads the accumulator in its epilogue (beta = 1)."""
    accumulator.addmm_(mat1, mat2)


@accumulate_mm.register_fake
def _(accumulator: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    return None


def split_projection(
    linear: nn.Module, attention: torch.Tensor, mlp: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``linear(cat(attention, mlp))`` as ``attention @ W_a^T + mlp @ W_m^T + b`` over views of its weight.

    ``accumulate``: the second GEMM adds into the first one's output (``accumulate_mm``), so the gating
    kernel after it reads one partial sum instead of two (28 MB less a single block at 1024x1024), and
    the bias joins that kernel."""
    return with_bias(*unbiased_projection(linear, attention, mlp, accumulate), attention)


def unbiased_projection(
    linear: nn.Module, attention: torch.Tensor, mlp: torch.Tensor, accumulate: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``split_projection``'s GEMMs and the bias still to add to their output (None: included). Accumulated,
    the output is returned as the GEMMs wrote it (rows flattened), so that the kernel that gates it adds the
    bias: this block's, or the next one's (``EpilogueSingleBlock.gating_deferred``)."""
    if type(linear) is not nn.Linear:  # swapped after the epilogues were applied: call it as is
        return linear(torch.cat([attention, mlp], dim=-1)), None
    dim = attention.shape[-1]
    if not accumulate:
        projected = F.linear(attention, linear.weight[:, :dim], linear.bias)
        return projected + F.linear(mlp, linear.weight[:, dim:]), None
    projected = torch.mm(attention.reshape(-1, dim), linear.weight[:, :dim].t())
    accumulate_mm(projected, mlp.reshape(-1, mlp.shape[-1]), linear.weight[:, dim:].t())
    return projected, linear.bias


def with_bias(projected: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``projected + bias`` shaped as ``like`` but for its last dimension (``projected`` as it is where its
    bias is included)."""
    return projected if bias is None else (projected + bias).view(*like.shape[:-1], -1)


def clipped(hidden_states: torch.Tensor) -> torch.Tensor:
    """fp16 kept finite, as diffusers' single block does."""
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


class PendingGating(NamedTuple):
    """A single block's output with its gating left to the next block (``EpilogueSingleBlock.
    gating_deferred``): ``residual + gate * (projected + bias)`` over its text and image rows, the text rows'
    residual travelling as the next block's ``encoder_hidden_states``."""

    image: torch.Tensor  # the residual's image rows
    projected: torch.Tensor  # ``proj_out``'s output, its rows flattened where two GEMMs accumulated it
    bias: torch.Tensor | None  # ``proj_out``'s bias where ``projected`` lacks it
    gate: torch.Tensor


def gated(text: torch.Tensor, pending: PendingGating) -> torch.Tensor:
    """The gating a block left to this one, in the single block's order of operations: in the compiled block
    it is one kernel with this block's norm, which reads the result it stores."""
    residual = torch.cat([text, pending.image], dim=1)
    projected = pending.projected.view(residual.shape)
    if pending.bias is not None:
        projected = projected + pending.bias
    return clipped(residual + pending.gate.unsqueeze(1) * projected)


class EpilogueSingleBlock(FluxSingleTransformerBlock):
    """FLUX.1's single block without the ``cat(attention, gelu(mlp))`` pass before ``proj_out``.

    It replaces diffusers' forward and also cache-dit's async Ulysses patch of it (a class-level patch
    this subclass shadows), whose only change, overlapping the attention's exchange with the MLP, it keeps.
    """

    def forward(  # type: ignore[override]  # a PendingGating in and out where gating is deferred
        self,
        hidden_states: torch.Tensor | PendingGating,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | PendingGating]:
        text_seq_len = encoder_hidden_states.shape[1]
        if isinstance(hidden_states, PendingGating):  # the block before left its gating to this one
            joint = gated(encoder_hidden_states, hidden_states)
            text, image = joint[:, :text_seq_len], joint[:, text_seq_len:]
        else:
            text, image = encoder_hidden_states, hidden_states
            joint = torch.cat([text, image], dim=1)
        norm_hidden_states, gate = self.norm(joint, emb=temb)
        # attention first: under cache-dit's async Ulysses it returns a pending exchange the MLP overlaps;
        # the fused processor does so when asked (``overlap``: its exchanges through symmetric memory)
        kwargs = joint_attention_kwargs or {}
        if getattr(self.attn.processor, "overlaps", False):
            kwargs = {**kwargs, "overlap": True}
        if self.image_rows_only:
            kwargs = {**kwargs, "queries_from": text_seq_len}
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **kwargs)
        if self.image_rows_only:  # the text rows' output is the model's to discard: none computed
            projected = self.projected(norm_hidden_states[:, text_seq_len:], attn_output)
            return encoder_hidden_states, clipped(image + gate.unsqueeze(1) * projected)
        if self.gating_deferred:
            return text, PendingGating(image, *self.ungated(norm_hidden_states, attn_output), gate)
        joint = clipped(joint + gate.unsqueeze(1) * self.projected(norm_hidden_states, attn_output))
        return joint[:, :text_seq_len], joint[:, text_seq_len:]

    # The transformer's last single block, on one GPU with the fused processor (``image_rows_last``): its
    # text rows' output is discarded by the model (only the image rows reach ``norm_out``), so it attends,
    # projects and gates the image rows only; its key and value still come from every row.
    image_rows_only = False
    # A single block that leaves its gating to the next one (``defer_gating``): it returns a
    # ``PendingGating`` for the next block's norm kernel to gate, one pass over the rows fewer.
    gating_deferred = False
    # split_projection's second GEMM adds into the first's output: the step 0.5% faster on an H100 (0.1255
    # against 0.1261 s, the image 3.551 against 3.567 s, 46.90 dB; lease 64, docs/performance.md)
    accumulate = True
    # the MLP's projection and GELU (``--quack-gelu``'s subclass takes quack's GEMM)
    projected_gelu = staticmethod(gelu_linear)

    def projected(self, norm_hidden_states: torch.Tensor, attn_output: Any) -> torch.Tensor:
        """``proj_out(cat(attention, gelu(proj_mlp(x))))``: ``ungated``'s output with its bias."""
        return with_bias(*self.ungated(norm_hidden_states, attn_output), norm_hidden_states)

    def ungated(
        self, norm_hidden_states: torch.Tensor, attn_output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``proj_out(cat(attention, gelu(proj_mlp(x))))`` and the bias still to add (None: included), the
        MLP's GEMM before the attention is awaited; the block gates the sum, or leaves it to the next block
        (``gating_deferred``), whose norm kernel then adds the bias.

        A ``PendingAttention`` attends after that GEMM (its query, key and value crossed beside it), and
        ``proj_out``'s MLP part runs before its output is awaited (the output crossing back beside it)."""
        if isinstance(attn_output, PendingAttention):
            return beside_projection(self.proj_mlp, self.proj_out, attn_output, norm_hidden_states), None
        mlp_hidden_states = self.projected_gelu(norm_hidden_states, self.proj_mlp)
        return unbiased_projection(self.proj_out, settled(attn_output), mlp_hidden_states, self.accumulate)


def beside_projection(
    proj_mlp: nn.Module, proj_out: nn.Module, attention: PendingAttention, hidden_states: torch.Tensor
) -> torch.Tensor:
    """``proj_out(cat(attention, gelu(proj_mlp(x))))`` with the attention's exchanges beside the GEMMs: the
    way in beside the MLP's projection, the way back beside ``proj_out``'s MLP part, then the attention's
    part added into it (``split_projection`` accumulated, its partial sums in the other order: bf16
    rounding apart, the same result)."""
    assert isinstance(proj_mlp, nn.Linear) and isinstance(proj_out, nn.Linear)  # EpilogueSingleBlock's
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    mlp = attention.attend_beside(flat, proj_mlp.weight, proj_mlp.bias)
    dim = mlp.shape[-1]
    projected, output = attention.settle_beside(mlp, proj_out.weight[:, -dim:].t())
    accumulate_mm(projected, output.reshape(projected.shape[0], -1), proj_out.weight[:, :-dim].t())
    return (projected + proj_out.bias).view(*hidden_states.shape[:-1], -1)


def image_rows_last(transformer: nn.Module) -> bool:
    """Have the last single block compute its image rows only (``EpilogueSingleBlock.image_rows_only``),
    where it has the epilogue forward and its attention processor attends a subset of query rows
    (``attends_query_rows``: the fused bf16 ones); returns whether it does. One GPU only: a
    sequence-parallel rank's rows are a shard."""
    blocks = getattr(transformer, "single_transformer_blocks", None)
    if not blocks:
        return False
    last = blocks[-1]
    processor = last.attn.processor if isinstance(last, EpilogueSingleBlock) else None
    if not getattr(processor, "attends_query_rows", False):
        return False
    last.image_rows_only = True
    return True


def defer_gating(transformer: nn.Module, deferred: bool) -> int:
    """Have each single block but the last leave its gating to the next one, whose norm kernel then gates
    (``deferred``), or gate its own output; returns how many blocks defer. Only where every single block has
    the epilogue forward. Cache-DiT's hooks compare the blocks' outputs, so its calls take them gated
    (the engine sets this per call)."""
    blocks = list(getattr(transformer, "single_transformer_blocks", ()))
    if not blocks or not all(isinstance(block, EpilogueSingleBlock) for block in blocks):
        return 0
    for block in blocks[:-1]:
        block.gating_deferred = deferred
    return len(blocks) - 1 if deferred else 0


def apply_gemm_epilogues(transformer: nn.Module) -> int:
    """Give FLUX.1's feed-forward GELUs and single blocks the epilogue forwards; returns how many changed.

    Call after quantization and parallel plans (they decide which weights stay plain), before compiling.
    The modules keep their parameters and names (only their class changes), so state dicts, Cache-DiT's
    block hooks and the sequence-parallel plans see the same model.
    """
    changed = 0
    for module in transformer.modules():
        if type(module) is GELU and module.approximate == "tanh" and plain_linear(module.proj):
            module.__class__ = EpilogueGELU
            changed += 1
        elif (
            type(module) is FluxSingleTransformerBlock
            and module.act_mlp.approximate == "tanh"
            and plain_linear(module.proj_mlp)
            and plain_linear(module.proj_out)
        ):
            module.__class__ = EpilogueSingleBlock
            changed += 1
    return changed
