"""CUDA kernel time of one piece of work, summed by kind (GEMM, attention, collectives, the rest)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def kernel_kind(name: str) -> str | None:
    """The kind of a CUDA kernel from its name (cuBLAS/CUTLASS GEMMs, SDPA kernels, NCCL); None for
    c10d's ``nccl:<collective>`` annotations, which span the collective's kernel on the GPU timeline
    (counting them too doubled the collectives' time)."""
    name = name.lower()
    if name.startswith("nccl:"):
        return None
    if name.startswith("triton_tem"):  # inductor's matmul templates
        return "GEMM"
    if name.startswith("triton_"):
        # inductor's fused pointwise/reduction kernels are named after every op they touch (a RoPE
        # kernel feeding SDPA says "scaled_dot_product_cudnn_attention")
        return "other (elementwise, norms, copies)"
    if "nccl" in name:
        return "collectives (NCCL)"
    if any(word in name for word in ("attention", "flash", "cudnn", "fmha", "sdpa")):
        return "attention"
    if any(word in name for word in ("gemm", "matmul", "cutlass", "sm90", "nvjet", "scaled_mm")):
        return "GEMM"
    return "other (elementwise, norms, copies)"


def kernel_seconds(work: Callable[[], Any]) -> dict[str, Any]:
    """Run ``work`` once under the profiler: seconds of CUDA kernel time per kind, per kind its heaviest
    kernels with their call counts (which attention kernel ran, where elementwise time goes), and the
    host's heaviest operations by their own CPU time (where a host-bound step spends it; the tracing
    itself inflates these)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # without a GPU (``--smoke``) the CPU trace checks the wiring: it holds no kernel time
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    with profile(activities=activities) as prof:
        work()
    kinds: dict[str, float] = {}
    kernels: dict[str, list[tuple[float, int, str]]] = {}
    host: list[tuple[float, int, str]] = []
    for event in prof.key_averages():
        if event.device_type == DeviceType.CPU:  # an operator or runtime call: its kernels come apart
            host.append((event.self_cpu_time_total / 1e6, event.count, event.key[:90]))
            continue
        seconds = event.device_time_total / 1e6
        kind = kernel_kind(event.key)
        if seconds <= 0 or kind is None:
            continue
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        kernels.setdefault(kind, []).append((seconds, event.count, event.key[:90]))
    report: dict[str, Any] = {kind: round(seconds, 3) for kind, seconds in sorted(kinds.items())}
    report["top"] = {
        kind: _heaviest(listed, 12 if kind.startswith("other") else 4) for kind, listed in kernels.items()
    }
    report["host_top"] = _heaviest(host, 12)
    return report


def _heaviest(listed: list[tuple[float, int, str]], count: int) -> list[dict[str, Any]]:
    return [
        {"name": name, "calls": calls, "s": round(seconds, 4)}
        for seconds, calls, name in sorted(listed, reverse=True)[:count]
    ]
