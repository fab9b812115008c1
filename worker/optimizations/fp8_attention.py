"""Attention in fp8 through cuDNN's fp8 flash attention (``--attention-fp8``, with ``--quantize fp8``).

Under ``--quantize fp8`` an H100 image spends 0.74 s of its 2.88 s in bf16 attention (docs/performance.md,
lease 31): the linear layers already run fp8 GEMMs. cuDNN's ``sdpa_fp8`` takes fp8 (e4m3) query, key and
value with one scale each, quantizes the softmax probabilities to e4m3 inside the kernel (they lie in
[0, 1]: scale 448) and accumulates in fp32. It is not lossless: the output's difference against bf16 is
measured and reported.

``fluxgate::sdpa_fp8`` is the op: fp8 (batch, tokens, heads, head_dim) inputs in any strides and fp32
descales on the device (no host sync). On Hopper cuDNN writes the output in fp8 too (a bf16 output is
Blackwell's only: cuDNN 9.19 on an H100 says so), so the output is e4m3 (batch, tokens, heads, head_dim)
on the value's scale: each output row is a convex combination of value rows, so ``|out| <= max |value|``
and the value's descale is the output's. The caller multiplies by it where it reads the output, which
under ``--compile`` fuses into the kernel that reads it next.

On CUDA the op runs a cuDNN graph (``worker.optimizations.fp8_attention_cudnn``: built once per shape and
layout through ``nvidia-cudnn-frontend``, over the cuDNN that torch ships, its fastest plan kept); on other
devices it runs the same math in fp32 (the probabilities unquantized), for the CPU tests. The processor
that feeds it lives in ``worker.optimizations.fp8_attention_processor``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8 = torch.float8_e4m3fn


class Fp8AttentionError(RuntimeError):
    """cuDNN's fp8 attention cannot run here; the message says why."""


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 with one scale: its absolute maximum maps to 448. Returns (fp8, descale (1,) fp32).

    Traceable (no host sync): under ``--compile`` the maximum and the rounding are two fused passes.
    """
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    quantized = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return quantized, (1.0 / scale).reshape(1)


def reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The op's math through SDPA in ``dtype`` on any device: dequantize, attend, requantize on the value's
    scale (the probabilities unquantized). In fp32 for the CPU; in bf16 for shapes cuDNN's fp8 attention
    does not take."""
    q, k, v = (
        (x.to(dtype) * d.to(dtype)).transpose(1, 2)
        for x, d in ((query, descale_q), (key, descale_k), (value, descale_v))
    )
    out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).float() / descale_v
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).contiguous()


@torch.library.custom_op("fluxgate::sdpa_fp8", mutates_args=())
def sdpa_fp8(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of e4m3 (batch, tokens, heads, head_dim) tensors; e4m3 out, on ``descale_v``'s scale."""
    if query.is_cuda:
        from worker.optimizations.fp8_attention_cudnn import cudnn_sdpa_fp8

        return cudnn_sdpa_fp8(query, key, value, descale_q, descale_k, descale_v, scale)
    return reference(query, key, value, descale_q, descale_k, descale_v, scale)


@sdpa_fp8.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return output_like(query, value)


def output_like(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, tokens, heads, _ = query.shape
    return query.new_empty((batch, tokens, heads, value.shape[-1]), dtype=FP8)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def cudnn_module() -> Any:
    """The cuDNN frontend's Python package, or ``Fp8AttentionError`` naming what to install."""
    try:
        import cudnn
    except ImportError as error:
        raise Fp8AttentionError(
            f"--attention-fp8 needs nvidia-cudnn-frontend (pip install 'fluxgate[fp8-attention]'): {error}"
        ) from error
    return cudnn


def check_fp8_attention_supported(device: torch.device) -> None:
    """Raise ``Fp8AttentionError`` unless cuDNN's fp8 attention can run on ``device`` (Hopper or newer)."""
    if device.type != "cuda":
        raise Fp8AttentionError(
            f"--attention-fp8 needs a CUDA GPU (Hopper or newer); this worker runs on {device.type}"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        raise Fp8AttentionError(
            f"--attention-fp8 needs compute capability >= 9.0 (cuDNN's fp8 attention: H100 or newer); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )
    cudnn_module()
