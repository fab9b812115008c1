"""FLUX.1's feed-forward input projections with their tanh GELU in quack's GEMM epilogue (``--quack-gelu``).

With ``--compile`` the GELU already runs in cuBLASLt's epilogue (``worker.optimizations.epilogues``): no
pass over the 4,608 x 12,288 activations, but the ``gelubias`` kernels run 5% slower than cuBLAS's bias
alone at the single blocks' 4,608 rows (534 against 508 µs on an H100) and 1.5% at the double blocks'
4,096 (474 against 467 µs). quack's CuTe DSL GEMM with the GELU in its epilogue, ``tanh`` on the SFU
(``worker.optimizations.quack_epilogues.gelu_biased``), in 256 x 192 cooperative tiles (2 x 1 clusters),
takes 508.5 µs at 4,608 rows and 460.5 µs at 4,096 rows, 4.7% and 2.9% under cuBLAS's GELU, with the same
largest error against fp32 (``bench.quack_check --parts gelu``, lease 114, docs/performance.md). That
predicts ~1.3 ms a step, ~36 ms a 28-step image; profiled in the image the GELU GEMMs took 16 ms less
(lease 115).

On by default with ``--quack-gating``: the two together took the lossless image from 3.550-3.582 to
3.483-3.498 s on one H100 (lease 115, the variants interleaved, every run with them faster than every run
without), and from 3.444 to 3.403-3.410 s on another (lease 116); `fast` 1.475 to 1.458 s. Alone, the GELU
moved the image within the noise (3.544 against 3.550 s, lease 115).

- ``fluxgate::quack_gelu_linear`` is an op opaque to the compiler. On a CUDA tensor of at least
  ``MIN_ROWS`` rows whose widths quack's tiles take, it launches quack's GEMM with the pinned tiles (no
  autotuning: a warm-up compiles one kernel); a CUDA tensor of fewer rows (the double blocks' 512 text
  tokens, not measured with quack) keeps cuBLAS's GELU epilogue. Elsewhere it computes diffusers' math
  with torch (the CPU tests).
- ``QuackGELU`` and ``QuackGELUSingleBlock`` are the epilogue forwards (``EpilogueGELU``,
  ``EpilogueSingleBlock``) with that op as their GELU.
- Where: one Hopper GPU, ``--compile`` with the GEMM epilogues, a resident unsharded transformer, quack
  installed, and a trial call at load that builds the kernel (``quack_gelu_unavailable``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.optimizations.epilogues import EpilogueGELU, EpilogueSingleBlock, gelu_linear
from worker.optimizations.quack_gating import quack_unavailable
from worker.optimizations.trials import trial_failure

# (tile rows, tile columns, pingpong, cluster rows, cluster columns): the fastest of seven at both the
# single blocks' 4,608 rows and the double blocks' 4,096 (lease 114)
TILES = (256, 192, False, 2, 1)
# fewer rows (the text stream's 512) keep cuBLAS's epilogue: quack was measured at 4,096 and 4,608 only
MIN_ROWS = 1024


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether quack's GEMM takes these operands: enough rows, bf16, rows of 16-byte multiples (its TMA
    copies), the input's rows and the weight contiguous."""
    return (
        x.shape[0] >= MIN_ROWS
        and x.dtype == weight.dtype == torch.bfloat16
        and x.shape[1] % 8 == 0
        and weight.shape[0] % 8 == 0
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and weight.is_contiguous()
    )


@torch.library.custom_op("fluxgate::quack_gelu_linear", mutates_args=())
def quack_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")`` for rows ``x`` (tokens x inputs): quack's GEMM with
    the GELU in its epilogue where it takes the operands on CUDA, cuBLAS's GELU epilogue for other CUDA
    operands, torch elsewhere."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    if not takes(x, weight):
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    from worker.optimizations.quack_epilogues import gelu_biased
    from worker.optimizations.quack_qk import hopper_config

    out = x.new_empty(x.shape[0], weight.shape[0])
    gelu_biased(x, weight.t(), out={"D": out}, config=hopper_config(*TILES), tuned=False, bias=bias)
    return out


@quack_gelu_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def quack_gelu(hidden_states: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")`` through ``quack_gelu_linear``; a layer swapped in after the
    classes changed (an adapter wrapping the linear) goes the epilogues' way."""
    if type(linear) is not nn.Linear or linear.bias is None:
        return gelu_linear(hidden_states, linear)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = quack_gelu_linear(flat, linear.weight, linear.bias)
    return out.view(*hidden_states.shape[:-1], out.shape[-1])


class QuackGELU(EpilogueGELU):
    """diffusers' ``GELU`` (a projection, then the activation) as one quack GEMM with the GELU inside."""

    projected_gelu = staticmethod(quack_gelu)


class QuackGELUSingleBlock(EpilogueSingleBlock):
    """The epilogue single block, its MLP's projection and GELU one quack GEMM."""

    projected_gelu = staticmethod(quack_gelu)


# the epilogue forwards' classes and their quack subclasses
QUACK_CLASSES: dict[type, type] = {EpilogueGELU: QuackGELU, EpilogueSingleBlock: QuackGELUSingleBlock}


def quack_gelu_unavailable(device: torch.device) -> str | None:
    """Why the GELU epilogue cannot run on ``device`` (``None``: it can): quack's GEMMs run there
    (``quack_gating.quack_unavailable``) and one small projection with the GELU builds."""
    return quack_unavailable(device) or trial_failure("quack's GELU epilogue", trial_call, device)


def trial_call(device: torch.device) -> None:
    """One small projection with its GELU in the pinned tiles: builds the kernel at load."""
    x = torch.zeros(MIN_ROWS, 256, device=device, dtype=torch.bfloat16)
    weight = torch.zeros(384, 256, device=device, dtype=torch.bfloat16)
    quack_gelu_linear(x, weight, torch.zeros(384, device=device, dtype=torch.bfloat16))
    torch.cuda.synchronize(device)


def apply_quack_gelu(transformer: nn.Module) -> int:
    """Give the epilogue forwards (``apply_gemm_epilogues``' classes) quack's GELU; returns how many changed.

    Call after ``apply_gemm_epilogues``; the modules keep their parameters and names."""
    changed = 0
    for module in transformer.modules():
        new: Any = QUACK_CLASSES.get(type(module))
        if new is not None:
            module.__class__ = new
            changed += 1
    return changed
