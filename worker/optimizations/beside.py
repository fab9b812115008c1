"""What runs beside a GEMM inside one op: the side stream, and the attention and GEMM such ops call.

FLUX.1's single blocks have GEMMs that do not depend on their attention: ``proj_mlp`` reads the block's
normed input, ``proj_out``'s MLP part reads ``gelu(proj_mlp)``. Timed alone on an H100 (``bench.
concurrency``, docs/performance.md), a Ulysses-2 rank's attention (12 heads over 4,608 tokens) runs at 81%
of one GPU's rate (243.5 us for half of 394.6 us's work), and launched beside ``proj_out``'s MLP part on a
stream of higher priority the pair takes 457 us against 494 us for the two alone: the GEMM's programs fill
the SMs the attention leaves idle. The GEMMs cuBLAS runs with a memset before them (its stream-K
counters) gain nothing so: ``proj_mlp`` beside the attention 490 against 480 us, and on one GPU 905
against 857 us (the pipeline on one H100: 3.587 against 3.567 s, not adopted).

Each pair is one op, so the compiled graph cannot move the GEMM away from it: the side stream waits for
the caller's, the two run, and the caller's stream waits for the side stream before the op returns, so
every op's work is ordered after the previous op's on both streams (``worker.optimizations.
symmetric_exchange`` relies on that for its barriers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_side_streams: dict[int | None, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the work beside a GEMM runs on (high priority: its programs take the SMs first, the
    GEMM's fill the rest)."""
    if device.index not in _side_streams:
        _side_streams[device.index] = torch.cuda.Stream(device, priority=-1)
    return _side_streams[device.index]


def attend_named(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """diffusers' attention dispatch by backend name ("": its default): (batch, tokens, heads, head_dim) in
    and out, contiguous (the layout the op's fake gives)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    chosen: Any = AttentionBackendName(backend) if backend else None
    return dispatch_attention_fn(query, key, value, backend=chosen).contiguous()


def gelu_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(hidden @ weight^T + bias)`` (tanh), the GELU in cuBLASLt's epilogue on CUDA (``hidden`` 2-D)."""
    if not hidden.is_cuda:  # the CPU kernel's epilogue GELU is the exact one
        return F.gelu(F.linear(hidden, weight, bias), approximate="tanh")
    return torch._addmm_activation(bias, hidden, weight.t(), use_gelu=True)
