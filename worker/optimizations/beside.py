"""Work run beside a GEMM inside one op: the attention's last wave filled, exchanges hidden.

cuDNN's attention runs one program per 64 queries of a head, so at 1024x1024 its last wave leaves most
SMs idle for one program's time: one GPU runs 24 heads (6.5 waves on 132 SMs), a Ulysses-2 rank 12 (3.3
waves). FLUX.1's single blocks have GEMMs that do not depend on their attention: ``proj_mlp`` reads the
block's normed input, ``proj_out``'s MLP part reads ``gelu(proj_mlp)``. Launched beside the attention on a
stream of lower priority, a GEMM's programs fill the SMs the attention frees. Timed alone on an H100
(``bench.concurrency``, docs/performance.md): the attention and ``proj_mlp`` 905 us together against 964
us one after the other at one GPU's shapes; a Ulysses-2 rank's attention and ``proj_out``'s MLP part 457
against 507 us.

Each pair is one op, so the compiled graph cannot move the GEMM away from it: the side stream waits for
the caller's, the two run, and the caller's stream waits for the side stream before the op returns, so
every op's work is ordered after the previous op's on both streams (``worker.optimizations.
symmetric_exchange`` relies on that for its barriers). Off CUDA the two run one after the other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_side_streams: dict[int | None, torch.cuda.Stream] = {}


def beside_applies(tensor: torch.Tensor) -> bool:
    """Streams to run work beside: CUDA tensors."""
    return tensor.is_cuda


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


@torch.library.custom_op("fluxgate::attention_beside_gelu_linear", mutates_args=())
def attention_beside_gelu_linear(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention (``attend_named``) on the side stream, ``gelu_projection`` on the caller's, joined:
    (the attention's output, the projection)."""
    if not query.is_cuda:
        return attend_named(query, key, value, backend), gelu_projection(hidden, weight, bias)
    main, side = torch.cuda.current_stream(query.device), side_stream(query.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = attend_named(query, key, value, backend)
    projected = gelu_projection(hidden, weight, bias)
    main.wait_stream(side)
    out.record_stream(main)  # made on the side stream, read on the caller's
    return out, projected


@attention_beside_gelu_linear.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = query.new_empty(*query.shape[:-1], value.shape[-1])
    return out, hidden.new_empty(hidden.shape[0], weight.shape[0])
