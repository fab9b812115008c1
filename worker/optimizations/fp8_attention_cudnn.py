"""cuDNN's fp8 attention graphs behind ``fluxgate::sdpa_fp8`` (``worker.optimizations.fp8_attention``).

One graph per device, shape, layout and softmax scale, built at its first call through the cuDNN frontend's
Python API over the cuDNN torch ships. cuDNN proposes several plans (kernel configurations); each is timed
once on that first call's tensors and the fastest kept, unless the call is being captured into a CUDA graph
(then cuDNN's first choice is kept). Shapes cuDNN has no plan for attend in bf16 (``reference`` in bf16).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from worker.optimizations.fp8_attention import (
    E4M3_MAX,
    FP8,
    Fp8AttentionError,
    cudnn_module,
    output_like,
    reference,
)

log = logging.getLogger("fluxgate.engine")


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
    timings_ms: dict[str, float] = field(default_factory=dict)  # each candidate plan on its first call


@dataclass
class _DeviceState:
    handle: Any
    constants: dict[Uid, torch.Tensor]  # the probabilities' scales and the amax sinks


_LOCK = threading.Lock()
_PLANS: dict[tuple[Any, ...], _Plan | None] = {}  # None: cuDNN has no plan; the op attends in bf16
_DEVICES: dict[int, _DeviceState] = {}


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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, pack: dict[int, torch.Tensor]
) -> _Plan | None:
    """The built plan for these shapes, the fastest cuDNN proposes; None (logged once) where it has none."""
    plan_id = plan_key(query, key, value, scale)
    if plan_id not in _PLANS:
        with _LOCK:
            if plan_id not in _PLANS:
                handle = _device_state(query.device).handle
                try:
                    plan = _build_plan(query, key, value, scale, handle)
                except Fp8AttentionError as error:
                    log.warning("fp8 attention: %s; these shapes attend in bf16", error)
                    _PLANS[plan_id] = None
                    return None
                # timing needs a live stream; while capturing, cuDNN's first choice stays
                capturing = torch.cuda.is_current_stream_capturing()
                if not capturing and not _keep_fastest(plan, pack, handle, query.device):
                    log.warning(
                        "fp8 attention: no cuDNN plan ran for q%s; these shapes attend in bf16",
                        tuple(query.shape),
                    )
                    _PLANS[plan_id] = None
                    return None
                _PLANS[plan_id] = plan
    return _PLANS[plan_id]


def _keep_fastest(plan: _Plan, pack: dict[int, torch.Tensor], handle: Any, device: torch.device) -> bool:
    """Time each plan cuDNN proposes on this call's tensors (once per shape) and select the fastest;
    False where none ran."""
    graph, chosen = plan.graph, None
    for index in range(graph.get_execution_plan_count()):
        try:
            graph.build_plan_at_index(index)
            size = max(int(graph.get_workspace_size_plan_at_index(index)), 1)
            workspace = torch.empty(size, dtype=torch.uint8, device=device)
            ms = _time_ms(lambda: graph.execute_plan_at_index(pack, workspace, index, handle))  # noqa: B023
        except Exception as error:  # a candidate that does not build or run is skipped, not fatal
            log.debug("fp8 attention: plan %d skipped: %s", index, error)
            continue
        plan.timings_ms[f"{index}: {graph.get_plan_name_at_index(index)}"] = round(ms, 4)
        if chosen is None or ms < chosen[1]:
            chosen = (index, ms, size)
    if chosen is None:
        return False
    graph.build_plan_at_index(chosen[0])
    plan.workspace_bytes = chosen[2]
    log.info("fp8 attention plans (ms): %s", plan.timings_ms)
    return True


def _time_ms(run: Any, repeats: int = 5) -> float:
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / repeats


def cudnn_sdpa_fp8(
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
    cudnn.set_stream(handle=state.handle, stream=torch.cuda.current_stream(query.device).cuda_stream)
    out = output_like(query, value)
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
    plan = _plan(query, key, value, scale, pack)
    if plan is None:
        return reference(query, key, value, descale_q, descale_k, descale_v, scale, torch.bfloat16)
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=query.device)
    plan.graph.execute(pack, workspace, handle=state.handle)
    return out
