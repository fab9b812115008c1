"""FLUX.1's fp8 MLP glue as Fluxgate's kernels: the GELU and the per-row fp8 quantization before the MLP's
output GEMM (an experiment: measured no faster than inductor's fusion, so the worker does not apply it).

Under ``--quantize fp8`` torchao quantizes each activation row before an fp8 GEMM: the row's absolute
maximum, then every element divided by it and rounded to fp8. The compiled single blocks spend 0.31 s an
image on an H100 doing that for ``proj_out``'s input, ``cat(attention, gelu(mlp))`` over 15,360 features, as
two inductor kernels reading the attention output in its head-major layout; the double blocks' feed-forwards
another 0.11 s for ``gelu(proj(x))`` (docs/performance.md, lease 24).

``fluxgate::fp8_quantize_rows`` reads contiguous rows in (row, 1,024-feature chunk) programs: the chunks'
maxima, then each chunk divided by its row's scale and rounded. The GEMM after it is torchao's own call,
``torch._scaled_mm`` on the weight's fp8 data and per-channel scales. The math is torchao's eager math: the
GELU rounded to bf16 as eager's module returns it, the scale ``bf16(amax / 448)`` in fp32, each element
divided by it (IEEE), clamped to +-448 and rounded to e4m3 — on the CPU the block's output equals torchao's
bit for bit, and on the H100 the rows and scales equal the eager reference's (``bench.fp8_mlp_check``). One
deliberate difference: a row of zeros gets a zero scale and zero data, where torchao's division gives NaN.

Measured (docs/performance.md, lease 29): 0.35 s of kernels an image against inductor's 0.42 s, but the image
no faster (2.898 s against 2.891 s): ~80 us of host time per call of the custom op. Earlier forms, one
program per row (looped, or the row held in registers), ran at 0.5-0.9 TB/s.

``apply_fp8_mlp_epilogues`` swaps the class of FLUX.1's single blocks and feed-forwards whose output linear
holds a per-row fp8 weight (``bench.pipeline``'s ``fp8-compiled-mlp-kernel``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn

from worker.optimizations.epilogues import EpilogueSingleBlock, settled, unhooked_linear

try:  # shipped with CUDA builds of torch; absent from CPU-only installs
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
KERNEL_CHUNK = 1024  # features per program; parts of other widths (not FLUX.1's) run the reference


def reference(
    head: torch.Tensor | None, tail: torch.Tensor, gelu_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's per-row e4m3 quantization of ``cat(head, gelu(tail) if gelu_tail else tail)``, as rows."""
    tail = F.gelu(tail, approximate="tanh") if gelu_tail else tail
    rows = torch.cat([head, tail], dim=-1) if head is not None else tail
    rows = rows.reshape(-1, rows.shape[-1])
    amax = rows.abs().amax(dim=-1, keepdim=True)
    scale = (amax / FP8_MAX).to(torch.float32)  # divided in the activation's dtype, as torchao's scale
    scaled = torch.where(scale > 0, rows.to(torch.float32) / scale, 0.0)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@torch.library.custom_op("fluxgate::fp8_quantize_rows", mutates_args=())
def fp8_quantize_rows(
    head: torch.Tensor | None, tail: torch.Tensor, gelu_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, head + tail features) in e4m3 and (rows, 1) fp32 scales; rows are the leading dimensions."""
    head_features = head.shape[-1] if head is not None else 0
    whole_chunks = head_features % KERNEL_CHUNK == 0 and tail.shape[-1] % KERNEL_CHUNK == 0
    if tail.is_cuda and triton is not None and whole_chunks and tail.shape[-1] > 0:
        return _triton_fp8_quantize_rows(head, tail, gelu_tail)
    return reference(head, tail, gelu_tail)


@fp8_quantize_rows.register_fake
def _(head: torch.Tensor | None, tail: torch.Tensor, gelu_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tail.numel() // tail.shape[-1]
    features = tail.shape[-1] + (head.shape[-1] if head is not None else 0)
    return tail.new_empty((rows, features), dtype=torch.float8_e4m3fn), tail.new_empty(
        (rows, 1), dtype=torch.float32
    )


if triton is not None:

    @triton.jit
    def _gelu_tanh(x):
        # PyTorch's CUDA kernel: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in fp32
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + libdevice.tanh(inner))

    @triton.jit
    def _chunk(head_ptr, tail_ptr, head_stride, tail_stride, row, chunk, HEAD, GELU, CHUNK):
        """Chunk ``chunk`` of the row ``cat(head, gelu(tail))`` in fp32, and its columns in the row."""
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        if chunk * CHUNK < HEAD:
            x = tl.load(head_ptr + row * head_stride + cols).to(tl.float32)
        else:
            x = tl.load(tail_ptr + row * tail_stride + (cols - HEAD))
            if GELU:
                x = _gelu_tanh(x.to(tl.float32)).to(x.dtype)  # eager's module returns it in bf16
            x = x.to(tl.float32)
        return x, cols

    @triton.jit
    def _chunk_amax_kernel(
        head_ptr,
        tail_ptr,
        amax_ptr,
        head_stride,
        tail_stride,
        HEAD: tl.constexpr,
        CHUNKS: tl.constexpr,
        GELU: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """Program (row, chunk): the chunk's absolute maximum."""
        row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        x, _ = _chunk(head_ptr, tail_ptr, head_stride, tail_stride, row, chunk, HEAD, GELU, CHUNK)
        tl.store(amax_ptr + row * CHUNKS + chunk, tl.max(tl.abs(x), axis=0))

    @triton.jit
    def _chunk_quantize_kernel(
        head_ptr,
        tail_ptr,
        amax_ptr,
        out_ptr,
        scale_ptr,
        head_stride,
        tail_stride,
        HEAD: tl.constexpr,
        FEATURES: tl.constexpr,
        CHUNKS: tl.constexpr,
        CHUNKS_BLOCK: tl.constexpr,
        GELU: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """Program (row, chunk): the row's scale from its chunks' maxima; the chunk divided and rounded."""
        row, chunk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        chunks = tl.arange(0, CHUNKS_BLOCK)
        amax = tl.max(tl.load(amax_ptr + row * CHUNKS + chunks, mask=chunks < CHUNKS, other=0.0), axis=0)
        # torch divides a bf16 tensor by a scalar as a product with its fp32 reciprocal, rounded to bf16
        scale = (amax * (1.0 / 448.0)).to(tail_ptr.dtype.element_ty).to(tl.float32)
        if chunk == 0:
            tl.store(scale_ptr + row, scale)
        x, cols = _chunk(head_ptr, tail_ptr, head_stride, tail_stride, row, chunk, HEAD, GELU, CHUNK)
        q = tl.where(scale > 0, tl.div_rn(x, scale), 0.0)
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        tl.store(out_ptr + row * FEATURES + cols, q.to(tl.float8e4nv))


def _triton_fp8_quantize_rows(
    head: torch.Tensor | None, tail: torch.Tensor, gelu_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    tail_rows = tail.reshape(-1, tail.shape[-1])
    head_rows = head.reshape(-1, head.shape[-1]) if head is not None else tail_rows[:, :0]
    for part in (head_rows, tail_rows):
        if part.stride(-1) != 1:
            raise ValueError("fp8_quantize_rows needs each row's features contiguous")
    if head_rows.dtype != tail_rows.dtype:
        raise ValueError("fp8_quantize_rows needs both parts in one dtype")
    rows, features = tail_rows.shape[0], head_rows.shape[1] + tail_rows.shape[1]
    out = tail.new_empty((rows, features), dtype=torch.float8_e4m3fn)
    scale = tail.new_empty((rows, 1), dtype=torch.float32)
    chunks = features // KERNEL_CHUNK
    amax = tail.new_empty((rows, chunks), dtype=torch.float32)
    grid = (rows, chunks)
    common = {"HEAD": head_rows.shape[1], "GELU": gelu_tail, "CHUNK": KERNEL_CHUNK, "num_warps": 4}
    strides = (head_rows.stride(0), tail_rows.stride(0))
    _chunk_amax_kernel[grid](head_rows, tail_rows, amax, *strides, CHUNKS=chunks, **common)
    _chunk_quantize_kernel[grid](
        head_rows,
        tail_rows,
        amax,
        out,
        scale,
        *strides,
        FEATURES=features,
        CHUNKS=chunks,
        CHUNKS_BLOCK=triton.next_power_of_2(chunks),
        **common,
    )
    return out, scale


def rowwise_fp8_linear(linear: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is torchao's per-row e4m3 tensor quantizing its input per row, and
    nothing hooked onto it: the layers ``--quantize fp8`` makes."""
    if not unhooked_linear(linear):
        return False
    weight: Any = linear.weight
    if type(weight).__name__ != "Float8Tensor":
        return False
    kwargs = weight.act_quant_kwargs
    return (
        weight.qdata.dtype == torch.float8_e4m3fn
        and list(weight.block_size) == [1, linear.in_features]
        and kwargs is not None
        and type(kwargs.granularity).__name__ == "PerRow"
        and kwargs.float8_dtype == torch.float8_e4m3fn
        and kwargs.hp_value_lb is None
        and kwargs.hp_value_ub is None
        and weight.mm_config is not None
        and linear.in_features % 16 == 0
    )


def fp8_project(
    rows: torch.Tensor,
    scale: torch.Tensor,
    linear: nn.Linear,
    like: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """torchao's GEMM for ``linear`` on activations already quantized per row, shaped as ``like`` (the
    activation they came from) but for its last dimension, in ``dtype`` (default: ``like``'s)."""
    weight: Any = linear.weight
    out = torch._scaled_mm(
        rows,
        weight.qdata.t(),
        scale_a=scale,
        scale_b=weight.scale.t(),
        bias=linear.bias,
        out_dtype=dtype or like.dtype,
        use_fast_accum=weight.mm_config.use_fast_accum,
    )
    return out.view(*like.shape[:-1], out.shape[-1])


class Fp8MlpSingleBlock(EpilogueSingleBlock):
    """FLUX.1's single block with ``proj_out``'s input (attention and GELU'd MLP) quantized by the kernels."""

    def ungated(
        self, norm_hidden_states: torch.Tensor, attn_output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mlp_hidden_states = self.proj_mlp(norm_hidden_states)
        attention = settled(attn_output)
        if not rowwise_fp8_linear(self.proj_out):  # swapped after this class was applied: diffusers' math
            return self.proj_out(torch.cat([attention, self.act_mlp(mlp_hidden_states)], dim=2)), None
        rows, scale = fp8_quantize_rows(attention.contiguous(), mlp_hidden_states, True)
        return fp8_project(rows, scale, self.proj_out, mlp_hidden_states), None  # the bias in the GEMM


class Fp8MlpFeedForward(FeedForward):
    """diffusers' ``FeedForward`` (GELU projection, dropout, output linear) with the GELU and the output
    linear's input quantization in one pass."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        net: Any = self.net
        gelu, dropout, output = net[0], net[1], net[2]
        if not rowwise_fp8_linear(output) or (dropout.training and dropout.p > 0):
            return super().forward(hidden_states, *args, **kwargs)
        projected = gelu.proj(hidden_states)
        rows, scale = fp8_quantize_rows(None, projected, True)
        return fp8_project(rows, scale, output, projected)


def mlp_gelu_tanh(feed_forward: nn.Module) -> bool:
    net = getattr(feed_forward, "net", None)
    if net is None or len(net) != 3 or type(net[1]) is not nn.Dropout:
        return False
    return type(net[0]).__name__ == "GELU" and getattr(net[0], "approximate", None) == "tanh"


def apply_fp8_mlp_epilogues(transformer: nn.Module) -> int:
    """Give FLUX.1's fp8 single blocks and feed-forwards the one-pass forwards; returns how many changed.

    Call after ``--quantize fp8`` (which makes the per-row fp8 weights), before compiling; the modules keep
    their parameters and names, only their class changes.
    """
    changed = 0
    for module in transformer.modules():
        if type(module) is FeedForward and mlp_gelu_tanh(module) and rowwise_fp8_linear(module.net[2]):
            module.__class__ = Fp8MlpFeedForward
            changed += 1
        elif (
            type(module) is FluxSingleTransformerBlock
            and module.act_mlp.approximate == "tanh"
            and rowwise_fp8_linear(module.proj_out)
        ):
            module.__class__ = Fp8MlpSingleBlock
            changed += 1
    return changed
