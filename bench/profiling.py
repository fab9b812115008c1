"""CUDA kernel time of one piece of work, summed by kind (GEMM, attention, collectives, the rest)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (cuBLAS/CUTLASS GEMMs, SDPA kernels, NCCL)."""
    name = name.lower()
    if "nccl" in name:
        return "collectives (NCCL)"
    if any(word in name for word in ("attention", "flash", "cudnn", "fmha", "sdpa")):
        return "attention"
    if any(word in name for word in ("gemm", "matmul", "cutlass", "sm90", "nvjet", "scaled_mm")):
        return "GEMM"
    return "other (elementwise, norms, copies)"


def kernel_seconds(work: Callable[[], Any]) -> dict[str, float]:
    """Run ``work`` once under the profiler; seconds of CUDA kernel time per kind, plus the top kernels
    of the rest (where elementwise time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    # without a GPU (``--smoke``) the CPU trace checks the wiring: it holds no kernel time
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        work()
    kinds: dict[str, float] = {}
    others: list[tuple[float, str]] = []
    for event in prof.key_averages():
        seconds = getattr(event, "device_time_total", 0.0) / 1e6
        if seconds <= 0:
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        if kind.startswith("other"):
            others.append((seconds, event.key[:80]))
    report: dict[str, Any] = {kind: round(seconds, 3) for kind, seconds in sorted(kinds.items())}
    report["top_other"] = {name: round(seconds, 4) for seconds, name in sorted(others, reverse=True)[:12]}
    return report
