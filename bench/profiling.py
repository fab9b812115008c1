"""CUDA kernel time of one piece of work, summed by kind (GEMM, attention, collectives, the rest)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

# the idle intervals between kernels, by length (µs): bubbles inside a replayed graph or a launch queue,
# gaps of a host that is behind, and the host's own work (tokenizing, a synchronization, Python)
GAP_CLASSES = ((10.0, "under 10 us"), (100.0, "10-100 us"), (float("inf"), "over 100 us"))


@dataclass(frozen=True)
class Span:
    """One kernel's, or one host operation's, interval on the profiler's clock (microseconds)."""

    start: float
    end: float
    name: str


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
        kind: _heaviest(listed, 20 if kind.startswith("other") else 8) for kind, listed in kernels.items()
    }
    report["host_top"] = _heaviest(host, 12)
    device, host_spans = spans(prof.events())
    report["idle"] = idle_gaps(device, host_spans)
    report["memsets_before"] = following(device, "Memset", 6)
    return report


def spans(events: Any) -> tuple[list[Span], list[Span]]:
    """The profile's device intervals (kernels, copies) and host operations, as spans."""
    from torch.autograd import DeviceType

    device: list[Span] = []
    host: list[Span] = []
    for event in events:
        span = Span(event.time_range.start, event.time_range.end, event.name[:90])
        if event.device_type == DeviceType.CPU:
            host.append(span)
        elif kernel_kind(event.name) is not None:  # c10d's annotations span their collective's kernel
            device.append(span)
    return device, host


def following(device: Sequence[Span], prefix: str, count: int) -> list[dict[str, Any]]:
    """The kernels that most often come right after one whose name starts with ``prefix`` (what a
    memset is for: the kernel whose buffer it clears), with how often."""
    ordered = sorted(device, key=lambda span: span.start)
    tally: dict[str, int] = {}
    for current, after in pairwise(ordered):
        if current.name.startswith(prefix) and not after.name.startswith(prefix):
            tally[after.name] = tally.get(after.name, 0) + 1
    ranked = sorted(tally.items(), key=lambda item: item[1], reverse=True)[:count]
    return [{"name": name, "calls": calls} for name, calls in ranked]


def idle_gaps(device: Sequence[Span], host: Sequence[Span], largest: int = 10) -> dict[str, Any]:
    """Where the GPU waited between its first and its last kernel: the busy and idle seconds, the idle
    time by gap length (``GAP_CLASSES``), and the ``largest`` gaps with the kernels on either side and
    the innermost host operations that lasted through most of the gap (what the host was doing)."""
    if not device:
        return {"busy_s": 0.0, "idle_s": 0.0, "by_length": {}, "largest": []}
    ordered = sorted(device, key=lambda span: span.start)
    busy = 0.0
    gaps: list[tuple[float, Span, Span]] = []  # (length, kernel before, kernel after)
    current, end = ordered[0], ordered[0].end
    start = ordered[0].start
    for span in ordered[1:]:
        if span.start > end:
            busy += end - start
            gaps.append((span.start - end, current, span))
            start = span.start
        if span.end >= end:
            current, end = span, span.end
    busy += end - start
    by_length: dict[str, list[float]] = {label: [0, 0.0] for _, label in GAP_CLASSES}
    for length, _, _ in gaps:
        label = next(label for limit, label in GAP_CLASSES if length < limit)
        by_length[label][0] += 1
        by_length[label][1] += length
    report_gaps = []
    for length, before, after in sorted(gaps, key=lambda gap: gap[0], reverse=True)[:largest]:
        gap_start, gap_end = before.end, after.start
        covering = [
            span
            for span in host
            if min(span.end, gap_end) - max(span.start, gap_start) >= 0.5 * (gap_end - gap_start)
        ]
        innermost = sorted(covering, key=lambda span: span.end - span.start)[:3]
        report_gaps.append(
            {
                "us": round(length, 1),
                "at_us": round(gap_start - ordered[0].start, 1),
                "after": before.name,
                "before": after.name,
                "host": [span.name for span in innermost],
            }
        )
    return {
        "busy_s": round(busy / 1e6, 6),
        "idle_s": round(sum(length for length, _, _ in gaps) / 1e6, 6),
        "by_length": {label: {"gaps": int(n), "s": round(s / 1e6, 6)} for label, (n, s) in by_length.items()},
        "largest": report_gaps,
        "by_neighbours": gaps_by_neighbours(gaps, largest),
    }


def gaps_by_neighbours(
    gaps: list[tuple[float, Span, Span]], count: int, shortest_us: float = 10.0
) -> list[dict[str, Any]]:
    """The gaps of ``shortest_us`` or more grouped by the kernels on either side (names cut to 60
    characters), the ``count`` groups with the most idle time first: where a replayed step still waits."""
    groups: dict[tuple[str, str], list[float]] = {}
    for length, before, after in gaps:
        if length >= shortest_us:
            group = groups.setdefault((before.name[:60], after.name[:60]), [0, 0.0])
            group[0] += 1
            group[1] += length
    heaviest = sorted(groups.items(), key=lambda item: item[1][1], reverse=True)[:count]
    return [
        {"after": after, "before": before, "gaps": int(n), "s": round(total / 1e6, 6)}
        for (after, before), (n, total) in heaviest
    ]


def _heaviest(listed: list[tuple[float, int, str]], count: int) -> list[dict[str, Any]]:
    return [
        {"name": name, "calls": calls, "s": round(seconds, 4)}
        for seconds, calls, name in sorted(listed, reverse=True)[:count]
    ]
