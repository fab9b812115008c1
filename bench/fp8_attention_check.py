"""cuDNN's fp8 attention at FLUX.1's shape on the GPU (``python -m bench.fp8_attention_check``).

One attention of FLUX.1-dev at 1024x1024: 24 heads of 128, 4608 tokens, the query and key head-major (as
``fluxgate::qk_norm_rope`` writes them), the value token-major. Reports which output types cuDNN builds,
the error of bf16 SDPA and of ``fluxgate::sdpa_fp8`` against fp32 attention (query/key scaled by their
absolute maximum, or by the bound their RMSNorm weight gives), both replayed inside a CUDA graph, and the
GPU time of each and of the value's quantization.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention_probe import errors, graph_ms, report
from worker.optimizations import fp8_attention as fa
from worker.optimizations import fp8_attention_cudnn as cudnn_graphs
from worker.optimizations.qk_norm_rope import qk_norm_rope, reference

HEADS, HEAD_DIM, TOKENS = 24, 128, 4608


def normed(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm per head, then head-major storage viewed token-major (the fused kernel's layout)."""
    x = F.rms_norm(tokens.float(), (HEAD_DIM,), weight.float(), 1e-6).to(torch.bfloat16)
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def probe_output_types(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor) -> dict[str, str]:
    handle = cudnn_graphs._device_state(q8.device).handle
    found = {}
    for out_type in ("BFLOAT16", "HALF", "FP8_E4M3"):
        try:
            cudnn_graphs._build_plan(q8, k8, v8, fa.default_scale(HEAD_DIM), handle, out_type)
            found[out_type] = "built"
        except Exception as error:
            found[out_type] = f"{type(error).__name__}: {str(error)[:300]}"
    return found


def fused_kernel_fp8(weight: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """The fused query/key kernel's e4m3 output at a double block's shape against its reference's."""
    device = weight.device
    text, image = (
        torch.randn(1, n, HEADS * HEAD_DIM, generator=generator, device=device) for n in (512, 4096)
    )
    angles = torch.rand(TOKENS, HEAD_DIM, generator=generator, device=device) * 6.3
    args = (text.bfloat16(), weight, image.bfloat16(), weight, angles.cos(), angles.sin(), 1e-6, HEAD_DIM)
    scale = (fa.E4M3_MAX / (math.sqrt(HEAD_DIM) * weight.abs().max().float())).reshape(1)
    got, expected = qk_norm_rope(*args, scale).float(), reference(*args, scale).float()
    difference = (got - expected).abs()
    return {
        "same_strides": got.stride() == expected.stride(),
        "elements_differing": int((difference > 0).sum().item()),
        "max_abs_diff_fp8_units": difference.max().item(),
        "triton_ms": round(graph_ms(lambda: qk_norm_rope(*args, scale))[0], 4),
        "triton_bf16_ms": round(graph_ms(lambda: qk_norm_rope(*args))[0], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    cudnn = fa.cudnn_module()
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)

    weight_q, weight_k = 1 + 0.2 * draw(HEAD_DIM), 1 + 0.2 * draw(HEAD_DIM)
    query = normed(draw(1, TOKENS, HEADS, HEAD_DIM), weight_q)
    key = normed(draw(1, TOKENS, HEADS, HEAD_DIM), weight_k)
    value = 3 * draw(1, TOKENS, HEADS, HEAD_DIM)
    scale = fa.default_scale(HEAD_DIM)
    q32, k32, v32 = (t.float().transpose(1, 2) for t in (query, key, value))
    truth = F.scaled_dot_product_attention(q32, k32, v32).transpose(1, 2)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn_torch": torch.backends.cudnn.version(),
        "cudnn_backend": cudnn.backend_version_string(),
        "cudnn_frontend": cudnn.__version__,
    }
    (q8, dq), (k8, dk), (v8, dv) = (fa.quantize_per_tensor(t) for t in (query, key, value))
    result["output_types"] = probe_output_types(q8, k8, v8)
    result["fused_kernel_fp8"] = fused_kernel_fp8(weight_q, generator)

    def bf16() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            )
        return out.transpose(1, 2)

    def fp8() -> torch.Tensor:
        return fa.sdpa_fp8(q8, k8, v8, dq, dk, dv, scale)

    bound_q, bound_k = (math.sqrt(HEAD_DIM) * w.abs().max().float() for w in (weight_q, weight_k))
    bq8 = (query.float() * (fa.E4M3_MAX / bound_q)).to(fa.FP8)
    bk8 = (key.float() * (fa.E4M3_MAX / bound_k)).to(fa.FP8)
    dbq, dbk = (bound_q / fa.E4M3_MAX).reshape(1), (bound_k / fa.E4M3_MAX).reshape(1)

    def fp8_bound() -> torch.Tensor:
        return fa.sdpa_fp8(bq8, bk8, v8, dbq, dbk, dv, scale)

    try:
        eager = fp8()
    except fa.Fp8AttentionError as error:
        result["error"] = str(error)
        report(result, args.output_file)
        return 1
    result["fp8_plans_ms"] = [plan.timings_ms for plan in cudnn_graphs._PLANS.values() if plan is not None]
    quantize_value = torch.compile(fa.quantize_per_tensor, fullgraph=True)
    dequantize = torch.compile(lambda out, descale: out.to(torch.bfloat16) * descale, fullgraph=True)
    flops = 4 * HEADS * TOKENS * TOKENS * HEAD_DIM
    one = torch.ones(1, device=device)
    for name, fn, descale in (
        ("bf16_cudnn", bf16, one),
        ("fp8", fp8, dv),
        ("fp8_weight_bound_qk", fp8_bound, dv),
    ):
        ms, out = graph_ms(fn)
        measured = errors(out.float() * descale, truth)
        result[name] = {"ms": round(ms, 4), "tflop_s": round(flops / ms / 1e9, 1), **measured}
    _, replayed = graph_ms(fp8, calls=1, replays=1)
    result["fp8_replay_equals_eager"] = bool(torch.equal(replayed.view(torch.uint8), eager.view(torch.uint8)))
    kernels: tuple[tuple[str, Callable[[], Any]], ...] = (
        ("quantize_value_compiled", lambda: quantize_value(value)),
        ("quantize_value_eager", lambda: fa.quantize_per_tensor(value)),
        ("dequantize_output_compiled", lambda: dequantize(eager, dv)),
    )
    for name, kernel in kernels:
        ms, _ = graph_ms(kernel)
        result[name] = {"ms": round(ms, 4)}
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
