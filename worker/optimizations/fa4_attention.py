"""FlashAttention-4's Hopper kernel as the fused processor's attention (``--no-fa4-attention`` turns it off).

The fused query/key processor (``worker.optimizations.qk_norm_rope``) attended through SDPA's cuDNN kernel.
``flash-attn-4`` (``flash_attn.cute``: CuTe DSL kernels; the DSL imported and the kernel compiled at a
process's first call, ~10.5 s in the warm-up, not per shape) has a Hopper forward kernel that is faster at
FLUX.1's shapes, bf16 in and out, replayed from CUDA graphs (``bench.fa4_check``, lease 84, one H100; µs a
call, sustained over ~1 s of calls):

====================================  ======  =====  =====
heads of 128, 4,608 tokens            cuDNN   FA4    FA4 / cuDNN
====================================  ======  =====  =====
24 (one GPU)                          453.7   426.5  0.940
12 (a Ulysses-2 rank)                 247.5   232.1  0.938
6 (a Ulysses-4 rank)                  122.1   113.2  0.927
====================================  ======  =====  =====

Inside the compiled lossless image on an H100: 3.493 s against 3.548 s with cuDNN's, the same image (46.9 dB
against eager either way); `fast` 1.467 against 1.480 s (lease 85, docs/performance.md).

Its output against fp32 attention is cuDNN's (max abs 0.00040 on the first head, both); the two differ by
at most one bf16 step (0.00098). The query, key and value are read token-major, as the processor writes
them, and the output is written token-major, as ``to_out`` reads it.

``fluxgate::fa4_attention`` is the op: (batch, tokens, heads, head_dim) bf16 or fp16, the last dimension
contiguous; opaque to the compiler. On CUDA it runs FA4; elsewhere SDPA's math (for the CPU tests). Where FA4
cannot run (no Hopper GPU, the package missing or failing its trial call at load, another dtype) the processor
keeps SDPA: ``fa4_unavailable`` says why, and the engine logs it at start.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from worker.optimizations.trials import trial_failure

# FA4's compile warns that an internal argument is no JIT argument (flash_attn.cute.utils.AuxData), once per
# compile; nothing the caller passes.
warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument")

HALF_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # FA4's Hopper forward takes head dims of 8 to 256, multiples of 8


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The op's math through SDPA, token-major in and out (contiguous, as FA4 writes it)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()


@torch.library.custom_op("fluxgate::fa4_attention", mutates_args=())
def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim), no mask: (batch, tokens, heads, head_dim) in and out."""
    if query.device.type != "cuda":
        return reference(query, key, value)
    from flash_attn.cute import flash_attn_func

    out: Any = flash_attn_func(query, key, value)
    return out[0] if isinstance(out, tuple) else out


@fa4_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def takes(query: torch.Tensor) -> bool:
    """Whether FA4 takes this query (its key and value alike): half precision, a head dim it compiles."""
    head_dim = query.shape[-1]
    return query.dtype in HALF_DTYPES and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM


def fa4_unavailable(device: torch.device) -> str | None:
    """Why FA4 cannot attend on ``device`` (``None``: it can): Hopper only, the GPU it was measured on; the
    package installed; and, where both hold, a trial call that succeeds (``trial_call``)."""
    if device.type != "cuda":
        return "FlashAttention-4 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"FlashAttention-4 runs on Hopper (sm_90, where it was measured), not sm_{major}{minor}"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:  # ``flash_attn`` itself missing
        found = False
    if not found:
        return "flash-attn-4 is not installed (pip install 'fluxgate[fa4-attention]')"
    return trial_failure("FlashAttention-4", trial_call, device)


def trial_call(device: torch.device) -> None:
    """One small bf16 attention through the op: imports the CuTe DSL and compiles the kernel (keyed by dtype
    and head dim, not by shape, so the warm-up's calls reuse it), at load rather than at the first job."""
    trial = torch.zeros(1, 128, 1, 128, device=device, dtype=torch.bfloat16)
    fa4_attention(trial, trial, trial)
    torch.cuda.synchronize(device)
