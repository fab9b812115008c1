"""FLUX.1's VAE decode at 1024x1024 as the worker runs it, and in channels-last (``bench.vae_check``).

Outside its 28 steps a lossless image on an H100 spends ~45 ms (lease 106): the text encoders, the decode
and the image's copy. The decode's convolutions run cuDNN's NHWC kernels (``..._nhwckrsc_nhwc``) on
NCHW tensors, and its GroupNorms reduce 4 channels x 1 M pixels per group in 32 groups. This times the
decoder (FLUX.1-dev's config, random weights, bf16) on one 128 x 128 x 16 latent:

* eager and compiled (``decoder.compile()``, the worker's ``--compile``), the tensors NCHW;
* the same with the VAE's weights and the latent in channels-last;
* compiled with inductor's reductions configured otherwise (``VARIANTS``);
* the worker's compiled decoder with its GroupNorms' statistics from the kernel that reads whole pixels
  (``worker.optimizations.group_stats``, the compiled variants not in ``INDUCTOR_STATS``), after a check of
  that kernel's statistics against torch's at the decoder's shapes, and with its mid-block attention as two
  GEMMs around a softmax (``worker.optimizations.vae_attention``, the compiled variants not in
  ``SDPA_ATTENTION``);

GPU milliseconds per decode from CUDA events (after the warm-up, which compiles), the peak memory, and each
output's max abs difference from the eager NCHW decode. ``--smoke`` runs a tiny VAE on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from diffusers import AutoencoderKL

from bench.attention_probe import time_ms
from bench.profiling import kernel_seconds
from bench.random_flux import init_random
from worker.optimizations.group_stats import apply_group_stats, group_norm_stats, pixels_rows
from worker.optimizations.vae_attention import apply_gemm_attention

FLUX_VAE = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
SMOKE_VAE = {**FLUX_VAE, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 8}
# name: (compiled, channels-last, inductor options). The options: GroupNorm's reductions of 4 channels x
# 1 M pixels per group without persistent reductions, with the reductions' launch configurations tuned
# (``max_autotune_pointwise``), or with coordinate descent over their block sizes.
VARIANTS: dict[str, tuple[bool, bool, dict[str, Any]]] = {
    "eager": (False, False, {}),
    "compiled": (True, False, {}),
    "eager-channels-last": (False, True, {}),
    "compiled-channels-last": (True, True, {}),
    "compiled-no-persistent": (True, False, {"triton.persistent_reductions": False}),
    "compiled-tuned": (True, False, {"max_autotune_pointwise": True}),
    "compiled-cd": (True, False, {"coordinate_descent_tuning": True}),
    # the worker's (tuned) with inductor's layout optimisation off (its tensors NCHW whatever the convolutions
    # prefer), and from channels-last weights and latent
    "compiled-tuned-no-layout": (True, False, {"max_autotune_pointwise": True, "layout_optimization": False}),
    "compiled-tuned-channels-last": (True, True, {"max_autotune_pointwise": True}),
    # the worker's (tuned) with its GroupNorms' statistics from inductor's reduction, not from the kernel
    # that reads whole pixels (worker.optimizations.group_stats), and with its mid-block attention on SDPA's
    # kernel, not two GEMMs around a softmax (worker.optimizations.vae_attention): the worker's defaults
    "compiled-tuned-inductor-stats": (True, False, {"max_autotune_pointwise": True}),
    "compiled-tuned-sdpa-attention": (True, False, {"max_autotune_pointwise": True}),
}
# compiled variants whose GroupNorms stay PyTorch's (the others take worker.optimizations.group_stats), and
# whose attention stays SDPA's (the others take worker.optimizations.vae_attention)
BEFORE = {"compiled", "compiled-channels-last", "compiled-no-persistent", "compiled-cd"}
BEFORE |= {"compiled-tuned-no-layout", "compiled-tuned-channels-last"}
INDUCTOR_STATS = BEFORE | {"compiled-tuned-inductor-stats"}
SDPA_ATTENTION = BEFORE | {"compiled-tuned-sdpa-attention"}
# the decoder's GroupNorm inputs at 1024 x 1024, and 1008 x 1008's uneven ones: (channels, side)
STATS_SHAPES = (
    (128, 1024),
    (256, 1024),
    (256, 512),
    (512, 512),
    (512, 256),
    (512, 128),
    (128, 1008),
    (512, 126),
)


def prepared(
    vae: Any,
    compiled: bool,
    channels_last: bool,
    options: dict[str, Any],
    stats: bool = False,
    gemm_attention: bool = False,
) -> Any:
    """A copy of ``vae`` with its decoder compiled (with these inductor options), its GroupNorms' statistics
    from ``worker.optimizations.group_stats`` (``stats``), its attention through two GEMMs
    (``gemm_attention``) and its weights in channels-last, as asked."""
    variant = copy.deepcopy(vae)
    if channels_last:
        variant.to(memory_format=torch.channels_last)
    if stats:
        apply_group_stats(variant.decoder)
    if gemm_attention:
        apply_gemm_attention(variant.decoder)
    if compiled:
        variant.decoder.compile(options=options or None)
    return variant


def stats_check(device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """``fluxgate::group_norm_stats`` on channels-last random activations of the decoder's shapes against
    torch's ``var_mean`` in fp32: the largest differences of the mean and of the reciprocal deviation
    (relative). A smoke run checks one small shape on the CPU (torch's statistics both)."""
    checks = []
    for channels, side in STATS_SHAPES if device.type == "cuda" else ((32, 16),):
        x = torch.randn(1, channels, side, side, device=device, dtype=dtype) * 3 + 1.5
        x = x.contiguous(memory_format=torch.channels_last)
        mean, rstd = group_norm_stats(x, 32, 1e-6)
        var, expected = torch.var_mean(x.float().reshape(1, 32, -1), dim=-1, correction=0)
        expected_rstd = torch.rsqrt(var + 1e-6)
        checks.append(
            {
                "shape": [channels, side, side],
                "kernel": x.is_cuda and pixels_rows(x, 32),
                "mean_max_abs_diff": float((mean - expected).abs().max()),
                "rstd_max_rel_diff": float(((rstd - expected_rstd) / expected_rstd).abs().max()),
            }
        )
    return checks


def decode_ms(decode: Any, repeats: int, cuda: bool) -> float:
    """Milliseconds per decode: CUDA events on a GPU (``time_ms``), the host's clock elsewhere."""
    if cuda:
        return time_ms(decode, repeats)
    started = time.perf_counter()
    for _ in range(repeats):
        decode()
    return (time.perf_counter() - started) * 1000 / repeats


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    vae: Any = init_random(AutoencoderKL(**(SMOKE_VAE if args.smoke else FLUX_VAE)))  # type: ignore[arg-type]
    vae = vae.to(device, dtype).eval()
    side = args.res // 8
    latents = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    results: dict[str, Any] = {
        "res": args.res,
        "device": torch.cuda.get_device_name() if not args.smoke else "cpu",
    }
    results["stats_check"] = stats_check(device, dtype)
    print("RESULT", json.dumps({"stats_check": results["stats_check"]}), flush=True)
    reference = None
    for name in args.variants.split(","):
        compiled, channels_last, options = VARIANTS[name]
        stats, gemm = compiled and name not in INDUCTOR_STATS, compiled and name not in SDPA_ATTENTION
        variant = prepared(vae, compiled, channels_last, options, stats, gemm)
        latent = latents.contiguous(memory_format=torch.channels_last) if channels_last else latents

        def decode(variant: Any = variant, latent: torch.Tensor = latent) -> torch.Tensor:
            return variant.decode(latent, return_dict=False)[0]

        started = time.perf_counter()
        output = decode()  # the warm-up: a compiled variant compiles here
        if not args.smoke:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = time.perf_counter() - started
        for _ in range(2):
            decode()
        entry: dict[str, Any] = {"warmup_s": round(warmup_s, 1)}
        entry["ms"] = round(decode_ms(decode, args.repeats, not args.smoke), 3)
        if not args.smoke:
            entry["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.profile and not args.smoke:
            entry["kernels"] = kernel_seconds(decode)
        output = decode().float()
        reference = output if reference is None else reference
        entry["max_abs_diff_vs_first"] = round(float((output - reference).abs().max()), 5)
        results[name] = entry
        print("RESULT", json.dumps({"variant": name, **entry}), flush=True)
        del variant
        torch._dynamo.reset()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="each decode's kernels by kind and name")
    parser.add_argument("--smoke", action="store_true", help="a tiny VAE on the CPU (checks the script)")
    parser.add_argument("--output-file")
    args = parser.parse_args()
    results = run(args)
    if args.output_file:
        with open(args.output_file, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
