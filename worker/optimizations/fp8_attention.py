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

On CUDA the op runs a cuDNN graph built once per shape and layout (``nvidia-cudnn-frontend``, over the
cuDNN that torch ships); on other devices it runs the same math in fp32 (the probabilities unquantized),
for the CPU tests. The processor that feeds it lives in ``worker.optimizations.fp8_attention_processor``.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("fluxgate.engine")

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
) -> torch.Tensor:
    """The op's math in fp32 on any device: dequantize, attend, requantize on the value's scale (the
    probabilities unquantized)."""
    q, k, v = (x.float() * d for x, d in ((query, descale_q), (key, descale_k), (value, descale_v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    out = (out.transpose(1, 2) / descale_v).clamp(-E4M3_MAX, E4M3_MAX)
    return out.to(FP8).contiguous()


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
        return _cudnn_sdpa_fp8(query, key, value, descale_q, descale_k, descale_v, scale)
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


class Uid(IntEnum):
    """The graph's operands, as the variant pack names them."""

    Q = 1
    K = 2
    V = 3
    O = 4  # noqa: E741 - cuDNN's name for the output
    DESCALE_Q = 5
    DESCALE_K = 6
    DESCALE_V = 7
    DESCALE_S = 8
    SCALE_S = 9
    SCALE_O = 10
    AMAX_S = 11
    AMAX_O = 12


@dataclass
class _Plan:
    graph: Any
    workspace_bytes: int


@dataclass
class _DeviceState:
    handle: Any
    constants: dict[Uid, torch.Tensor]  # the probabilities' scales and the amax sinks


_LOCK = threading.Lock()
_PLANS: dict[tuple[Any, ...], _Plan | None] = {}  # None: cuDNN has no plan; the op attends in bf16
_DEVICES: dict[int, _DeviceState] = {}


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


def bhsd(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """cuDNN's (batch, heads, tokens, head_dim) dims and strides of a (batch, tokens, heads, head_dim)
    tensor."""
    b, s, h, d = tensor.shape
    sb, ss, sh, sd = tensor.stride()
    return (b, h, s, d), (sb, sh, ss, sd)


def _device_state(device: torch.device) -> _DeviceState:
    index = device.index if device.index is not None else torch.cuda.current_device()
    state = _DEVICES.get(index)
    if state is None:
        cudnn = cudnn_module()
        with torch.cuda.device(index):
            one = torch.ones(1, dtype=torch.float32, device=device)
            constants = {
                Uid.SCALE_S: one * E4M3_MAX,  # softmax probabilities in [0, 1] -> [0, 448]
                Uid.DESCALE_S: one / E4M3_MAX,
                Uid.AMAX_S: torch.zeros_like(one),  # written by every call, read by none
                Uid.AMAX_O: torch.zeros_like(one),
            }
            state = _DeviceState(cudnn.create_handle(), constants)
        _DEVICES[index] = state
    return state


def plan_key(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> tuple[Any, ...]:
    return (query.device, *(bhsd(t) for t in (query, key, value)), scale)


def _build_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    handle: Any,
    out_type: str = "FP8_E4M3",
) -> _Plan:
    """A built cuDNN graph for these shapes and strides (``out_type``: another output type, for probes)."""
    cudnn = cudnn_module()
    fp32, e4m3 = cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    graph = cudnn.pygraph(
        io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle
    )
    operands = {}
    for uid, tensor in ((Uid.Q, query), (Uid.K, key), (Uid.V, value)):
        dims, strides = bhsd(tensor)
        operands[uid] = graph.tensor(uid=int(uid), dim=dims, stride=strides, data_type=e4m3)
    for uid in (Uid.DESCALE_Q, Uid.DESCALE_K, Uid.DESCALE_V, Uid.DESCALE_S, Uid.SCALE_S, Uid.SCALE_O):
        operands[uid] = graph.tensor(uid=int(uid), dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=operands[Uid.Q],
        k=operands[Uid.K],
        v=operands[Uid.V],
        descale_q=operands[Uid.DESCALE_Q],
        descale_k=operands[Uid.DESCALE_K],
        descale_v=operands[Uid.DESCALE_V],
        descale_s=operands[Uid.DESCALE_S],
        scale_s=operands[Uid.SCALE_S],
        scale_o=operands[Uid.SCALE_O],
        generate_stats=False,
        attn_scale=scale,
        use_causal_mask=False,
    )
    out_dims, out_strides = bhsd(output_like(query, value))
    out.set_uid(int(Uid.O)).set_output(True).set_dim(out_dims).set_stride(out_strides)
    out.set_data_type(getattr(cudnn.data_type, out_type))
    for uid, amax in ((Uid.AMAX_S, amax_s), (Uid.AMAX_O, amax_o)):
        amax.set_uid(int(uid)).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(
            fp32
        )
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as error:  # cuDNN's own exception types vary by version; the message is what matters
        raise Fp8AttentionError(
            f"cuDNN {cudnn.backend_version_string()} has no fp8 attention for q{tuple(query.shape)} "
            f"k{tuple(key.shape)} v{tuple(value.shape)}: {error}"
        ) from error
    return _Plan(graph, int(graph.get_workspace_size()))


def _plan(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, handle: Any
) -> _Plan | None:
    """The built plan for these shapes; None (logged once) where cuDNN has none."""
    plan_id = plan_key(query, key, value, scale)
    if plan_id not in _PLANS:
        with _LOCK:
            if plan_id not in _PLANS:
                try:
                    _PLANS[plan_id] = _build_plan(query, key, value, scale, handle)
                except Fp8AttentionError as error:
                    log.warning("fp8 attention: %s; these shapes attend in bf16", error)
                    _PLANS[plan_id] = None
    return _PLANS[plan_id]


def bf16_fallback(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The op's result through bf16 SDPA, for shapes cuDNN's fp8 attention does not take."""
    q, k, v = (
        (x.to(torch.bfloat16) * d.to(torch.bfloat16)).transpose(1, 2)
        for x, d in ((query, descale_q), (key, descale_k), (value, descale_v))
    )
    out = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).float() / descale_v
    return out.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).contiguous()


def _cudnn_sdpa_fp8(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.dtype != FP8:
            raise Fp8AttentionError(f"sdpa_fp8 takes float8_e4m3fn {name}; got {tensor.dtype}")
    cudnn = cudnn_module()
    state = _device_state(query.device)
    plan = _plan(query, key, value, scale, state.handle)
    if plan is None:
        return bf16_fallback(query, key, value, descale_q, descale_k, descale_v, scale)
    out = output_like(query, value)
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=query.device)
    pack = {
        int(Uid.Q): query,
        int(Uid.K): key,
        int(Uid.V): value,
        int(Uid.O): out,
        int(Uid.DESCALE_Q): descale_q.float(),
        int(Uid.DESCALE_K): descale_k.float(),
        int(Uid.DESCALE_V): descale_v.float(),
        int(Uid.SCALE_O): descale_v.float().reciprocal(),  # the output on the value's scale
        **{int(uid): tensor for uid, tensor in state.constants.items()},
    }
    cudnn.set_stream(handle=state.handle, stream=torch.cuda.current_stream(query.device).cuda_stream)
    plan.graph.execute(pack, workspace, handle=state.handle)
    return out
