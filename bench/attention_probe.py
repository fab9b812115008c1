"""Attention kernels at FLUX.1-dev's shape (24 heads x 128, 4096 + 512 tokens), bf16, one GPU.

Times torch SDPA per backend on [B, H, S, D] inputs made contiguous, and on the strided views that
FLUX's processors hand over ([B, S, H, D] transposed), to see what layout costs each kernel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def errors(got: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """``got`` against ``truth`` (fp32): relative L2, max abs difference, PSNR on ``truth``'s peak."""
    difference = got.float() - truth
    mse = difference.square().mean().item()
    peak = truth.abs().max().item()
    return {
        "relative_l2": round(difference.norm().item() / truth.norm().item(), 6),
        "max_abs": round(difference.abs().max().item(), 6),
        "psnr_db": round(10 * math.log10(peak * peak / mse), 2) if mse else float("inf"),
    }


def report(result: dict[str, Any], output_file: str | None) -> None:
    """A kernel check's result: the ``RESULT`` line the device suite greps, and the JSON file if asked."""
    print("RESULT", json.dumps(result))
    if output_file:
        with open(output_file, "w") as handle:
            json.dump(result, handle, indent=1)


def time_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def captured(fn: Callable[[], Any], calls: int) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``calls`` calls of ``fn`` captured in a CUDA graph (after three warm-up calls on a side stream), and
    the last call's output (written again at each replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    return graph, out


def graph_ms(fn: Callable[[], Any], calls: int = 20, replays: int = 5) -> tuple[float, Any]:
    """GPU milliseconds per call with the host out of the way: ``calls`` calls captured, replayed."""
    graph, out = captured(fn, calls)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays), out


def main() -> None:
    batch, heads, tokens, dim = 1, 24, 4096 + 512, 128
    flops = 4 * batch * heads * tokens * tokens * dim
    bshd = [torch.randn(batch, tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    strided = [t.transpose(1, 2) for t in bshd]
    contiguous = [t.contiguous() for t in strided]
    results: dict[str, Any] = {}
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        for layout, (q, k, v) in (("contiguous", contiguous), ("strided", strided)):
            try:
                with sdpa_kernel(backend):
                    ms = time_ms(partial(torch.nn.functional.scaled_dot_product_attention, q, k, v))
                results[f"{name}/{layout}"] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as error:
                results[f"{name}/{layout}"] = {"error": str(error)[:120]}
    for layout, (q, k, v) in (("contiguous", contiguous), ("strided", strided)):  # torch's own choice
        ms = time_ms(partial(torch.nn.functional.scaled_dot_product_attention, q, k, v))
        results[f"default/{layout}"] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
    results["priority_order"] = [str(SDPBackend(int(b))) for b in torch._C._get_sdp_priority_order()]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        q, k, v = strided
        ms = time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q.contiguous(), k.contiguous(), v.contiguous()
            )
        )
    results["cudnn/strided+copy"] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)}
    print("ATTENTION " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
