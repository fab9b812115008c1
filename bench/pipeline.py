"""GPU pipeline benchmark: the worker's engine on FLUX.1-dev's architecture with random weights.

    python -m bench.pipeline --variants eager,cudnn,compiled --res 1024 --steps 28 --output-file out.json

Each variant builds a fresh pipeline on the GPU, applies the worker's load-time options through the
same code as ``fluxgate worker`` (``FluxEngine.from_pipeline``), warms it up, then times whole
images (text encoding, denoising, VAE decode, PIL conversion) and one transformer step (CUDA events,
median). Images are noise; the cost is the real one. Variants run in the order given.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from bench.random_flux import build_flux1_dev
from shared.schemas import GenerationParams
from worker.engine import FluxEngine, internal_params
from worker.options import EngineOptions

# name -> (engine options, cache preset or None). Presets: cache-dit DBCache F1B0 with a fixed
# compute/cache step schedule (random weights never pass a residual threshold, so masks it is).
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "eager": ({}, None),
    "cudnn": ({"attention_backend": "_native_cudnn"}, None),
    "compiled": ({"compile": True}, None),
    "cudnn-compiled": ({"attention_backend": "_native_cudnn", "compile": True}, None),
    "autotune": ({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, None),
    "offload": ({"dit_cpu_offload": True, "text_encoder_cpu_offload": True, "pin_cpu_memory": True}, None),
    "offload-budget-24": ({"gpu_memory_budget_gb": 24, "pin_cpu_memory": True}, None),
    "cache-medium": ({"compile": True}, "medium"),
    "cache-fast": ({"compile": True}, "fast"),
    "cache-ultra": ({"compile": True}, "ultra"),
}


def transformer_step_s(pipe: Any, width: int, height: int, repeats: int = 10) -> float:
    """Median time of one transformer forward at the pipeline's shapes (CUDA events)."""
    transformer, device, dtype = pipe.transformer, "cuda", torch.bfloat16
    tokens = (height // 16) * (width // 16)
    inputs = {
        "hidden_states": torch.randn(1, tokens, 64, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
        "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
    }
    times = []
    with torch.inference_mode():
        for index in range(repeats + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            transformer(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            if index >= 3:
                times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def image_params(width: int, height: int, steps: int, cache: str | None) -> GenerationParams:
    return internal_params(
        width, height, steps, cache or "off", prompt="a cat holding a sign that says hello world"
    )


def cache_factory(preset: str | None) -> Any:
    if preset is None:
        return None
    from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit

    # Static policy: the mask alone decides (as in ../shared/gpu/stock_cachedit_masks.py), since random
    # weights would make a dynamic policy's residual checks meaningless.
    presets = {preset: CacheDitConfig(enabled=True, scm_preset=preset, scm_policy="static", mc=-1)}
    return lambda pipe: apply_cache_dit(pipe, presets, default=preset)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(smoke: bool) -> Any:
    """FLUX.1-dev's architecture on the GPU; ``--smoke`` takes the tiny pipeline on the CPU instead."""
    if smoke:
        from worker.tiny_model import build_tiny_pipeline

        return build_tiny_pipeline("flux1")
    return build_flux1_dev("cuda")  # random init is fast on the GPU; offload variants then start on the CPU


def run_variant(name: str, width: int, height: int, steps: int, repeats: int, smoke: bool) -> dict[str, Any]:
    overrides, preset = VARIANTS[name]
    built = time.perf_counter()
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        overrides = {k: v for k, v in overrides.items() if k not in ("attention_backend", "pin_cpu_memory")}
        overrides["compile"] = False
    options = EngineOptions(
        device="cpu" if smoke else "cuda", dtype="float32" if smoke else "bfloat16", **overrides
    )
    pipe = build(smoke)
    if options.any_offload:
        pipe.to("cpu")
        if not smoke:
            torch.cuda.empty_cache()
    engine = FluxEngine.from_pipeline(pipe, options, device, cache_factory(preset))
    result: dict[str, Any] = {"variant": name, "options": overrides, "cache": preset}
    result["build_s"] = round(time.perf_counter() - built, 1)
    warm = time.perf_counter()
    engine.warmup([(width, height)], [preset or "off"], steps=steps if preset else 2)
    result["warmup_s"] = round(time.perf_counter() - warm, 1)
    seconds, cached = [], []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        output = engine.generate(image_params(width, height, steps, preset), lambda step, total: None)
        synchronize()
        seconds.append(time.perf_counter() - started)
        cached.append(output.cached_steps)
        result["peak_memory_gb"] = round((output.peak_memory_mb or 0) / 1024, 2)
    result["seconds"] = [round(s, 3) for s in seconds]
    result["median_s"] = round(statistics.median(seconds), 3)
    result["cached_steps"] = cached
    if not options.any_offload and preset is None and not smoke:
        result["step_s"] = round(transformer_step_s(pipe, width, height), 4)
    del engine, pipe
    gc.collect()
    if not smoke:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="eager,cudnn,cudnn-compiled", help=f"from: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-file")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny pipeline on the CPU: checks the script only"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    report: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "res": args.res,
        "steps": args.steps,
        "variants": [],
    }
    for name in names:
        result = run_variant(name, args.res, args.res, args.steps, args.repeats, args.smoke)
        report["variants"].append(result)
        print("RESULT " + json.dumps(result), flush=True)
        if args.output_file:
            with open(args.output_file, "w") as handle:
                json.dump(report, handle, indent=1)
    print(f"{'variant':<20}{'s/image':>10}{'step s':>9}{'peak GB':>9}{'cached':>8}")
    for result in report["variants"]:
        print(
            f"{result['variant']:<20}{result['median_s']:>10}{result.get('step_s', '-'):>9}"
            f"{result['peak_memory_gb']:>9}{result['cached_steps'][-1]:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
