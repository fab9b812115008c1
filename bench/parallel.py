"""Multi-GPU benchmark: one worker group (``--num-gpus``) on FLUX.1-dev's architecture, random weights.

    python -m bench.parallel --num-gpus 2 --ulysses-degree 2 --compile --output-file u2.json
    python -m bench.parallel --num-gpus 2 --compile --ulysses-async --parallel-vae --cache fast

The process is rank 0 of a real worker group (``worker.group``: it spawns ranks 1..N-1, shares
each job over the control channel and runs the pipeline in lockstep with them), so the timings are
those of the production path. Every rank builds the same random weights (same seed), applies the
worker's load-time options (``FluxEngine.from_pipeline``: sequence parallelism on ``--sp-runtime``,
``--ulysses-async``, ``--parallel-vae``, compile; the Cache-DiT preset of ``--cache``: a step mask
with the static policy, as ``bench.pipeline`` times them, or ``default``, the threshold preset of the
``FLUXGATE_CACHE_DIT_*`` knobs) and warms up. Before the group is formed, rank 0 draws a one-GPU image
with the same seed, the plain pipeline, the same cache preset and (``--parallel-vae``) the same decode
tiles; the group's image is compared with it (PSNR, max pixel difference): bf16 tolerance is expected,
not equality. ``--profile`` adds a CUDA-kernel breakdown of one image on rank 0. ``--smoke`` runs the
tiny model on CPU ranks (gloo) to check the flags, not to time them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config

from bench.profiling import kernel_seconds
from bench.whole import compile_whole
from worker.engine import FluxEngine, internal_params
from worker.optimizations.epilogues import apply_gemm_epilogues
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.options import EngineOptions

log = logging.getLogger("fluxgate.bench")
SEED = 0
PROMPT = "a cat holding a sign that says hello world"


def build_random_pipeline(smoke: bool) -> Any:
    """FLUX.1-dev's architecture on this rank's GPU; the tiny pipeline on the CPU for ``--smoke``."""
    torch.manual_seed(SEED)  # every rank draws the same weights
    if smoke:
        from worker.tiny_model import build_tiny_pipeline

        return build_tiny_pipeline("flux1", seed=SEED)
    from bench.random_flux import build_flux1_dev

    return build_flux1_dev(f"cuda:{torch.cuda.current_device()}")


@dataclass(frozen=True)
class BenchModel:
    """What every rank builds: the tiny model on the CPU (``--smoke``) or FLUX.1-dev's shapes on its GPU,
    with the Cache-DiT preset ``cache`` ("off": none)."""

    smoke: bool
    cache: str = "off"

    def cache_factory(self, environ: Mapping[str, str]) -> Any:
        """The engine's cache controller factory for ``cache``. A mask preset caches its mask's steps
        (static policy, as ``bench.pipeline`` times them: random weights make a threshold meaningless);
        ``default`` is the threshold preset of the ``FLUXGATE_CACHE_DIT_*`` knobs."""
        if self.cache == "off":
            return None
        import dataclasses

        from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit, cache_config_from_env

        if self.cache == "default":
            config = dataclasses.replace(cache_config_from_env(environ), enabled=True)
        else:
            config = CacheDitConfig(enabled=True, scm_preset=self.cache, scm_policy="static", mc=-1)
        return lambda pipe: apply_cache_dit(pipe, {self.cache: config})


def group_loader(model: BenchModel, options: EngineOptions, environ: Mapping[str, str]) -> FluxEngine:
    """Every rank's engine (a module-level function: spawned ranks import it); ``model`` rides in the
    loader's model argument; ``--overlap``, ``--skip-guards`` and the cache knobs in the environment the
    ranks inherit."""
    if os.environ.get("BENCH_COMM_OVERLAP") == "1":
        # Let inductor move each block's all-to-alls next to independent compute (an experiment).
        inductor_config.reorder_for_compute_comm_overlap = True
    device = torch.device("cpu") if model.smoke else torch.device("cuda", torch.cuda.current_device())
    pipeline = build_random_pipeline(model.smoke)
    if os.environ.get("BENCH_UNPACKED_EXCHANGE") == "1":
        # Ulysses' query, key and value in three exchanges, as diffusers sends them (the fused processor
        # packs them into one by default)
        FusedQKFluxAttnProcessor.packed_exchange = False
    if os.environ.get("BENCH_NO_OVERLAP") == "1":
        # ...and the single blocks' exchanges one after the other, not beside their MLP GEMMs
        FusedQKFluxAttnProcessor.overlaps = False
    if os.environ.get("BENCH_QK_ROPE") == "1":
        # The fused query/key norm + rotary processor, set before the sequence layout gives each processor
        # its parallel config (under Ulysses alone it then runs the packed exchange itself, unless
        # --unpacked-exchange: diffusers' dispatch, synchronously).
        apply_fused_qk_norm_rope(pipeline.transformer)
    engine = FluxEngine.from_pipeline(pipeline, options, device, model.cache_factory(os.environ))
    whole = os.environ.get("BENCH_WHOLE_COMPILE")
    if whole:
        if options.gemm_epilogues:  # as the regional compile has them
            apply_gemm_epilogues(pipeline.transformer)
        # An experiment on host overhead: the whole transformer (the sequence layout's hooks and
        # collectives included) as one compiled program, its time embedder eager (bench.whole: eager's
        # bf16 roundings); "reduce-overhead" replays each step as CUDA graphs. Graph breaks are counted
        # in the report.
        compile_whole(pipeline.transformer, whole)
    engine.warmup(options.resolutions, [model.cache])
    if os.environ.get("BENCH_SKIP_GUARDS") == "1":
        # An experiment on host overhead: compiled blocks run without evaluating their guards (torch
        # skips only guards it deems safe to; a changed input shape could run a stale graph).
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    return engine


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def timed(
    engine: Any, width: int, height: int, steps: int, cache: str = "off", marks: list[float] | None = None
) -> tuple[float, Any]:
    """Seconds of one job, and its output (images, cached steps); ``marks`` gets the host's time at each
    step's callback, from the job's start."""
    params = internal_params(width, height, steps, cache, prompt=PROMPT)
    synchronize()
    started = time.perf_counter()

    def on_step(step: int, total: int) -> None:
        if marks is not None:
            marks.append(time.perf_counter() - started)

    output = engine.generate(params, on_step)
    synchronize()
    return time.perf_counter() - started, output


def profiled(
    engine: Any, size: int, steps: int, cache: str, marks: list[float]
) -> tuple[float, Any, dict[str, Any]]:
    """``timed`` under the profiler (``kernel_seconds``): its seconds, its output and the profile."""
    runs: list[tuple[float, Any]] = []
    profile = kernel_seconds(lambda: runs.append(timed(engine, size, size, steps, cache, marks)))
    (elapsed, output), *_ = runs
    return elapsed, output, profile


def host_phases(seconds: float, marks: list[float]) -> dict[str, Any]:
    """Where a job's host time went: before the first step's callback, the longest wait between two
    callbacks (and after which step), after the last one (the decode and the image)."""
    if not marks:
        return {}
    gaps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    longest = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
    return {
        "to_first_step_s": round(marks[0], 3),
        "longest_step_gap_s": round(gaps[longest], 3) if longest is not None else None,
        "longest_gap_after_step": longest,
        "after_last_step_s": round(seconds - marks[-1], 3),
    }


def one_gpu_images(model: BenchModel, args: argparse.Namespace, sizes: list[int]) -> dict[int, np.ndarray]:
    """The images of the plain pipeline on one device, same seed, cache preset and decode tiles."""
    plain = build_random_pipeline(model.smoke)
    plain.set_progress_bar_config(disable=True)
    factory = model.cache_factory(os.environ)
    controller = factory(plain) if factory else None
    if args.parallel_vae:
        from worker.parallel_vae import split_decode_tiles

        split_decode_tiles(plain.vae, plain.vae.use_tiling)
    images = {}
    for size in sizes:
        params = internal_params(size, size, args.steps, model.cache, prompt=PROMPT)
        if controller is not None:
            controller.prepare(model.cache, args.steps)
        with torch.inference_mode():
            generator = torch.Generator("cpu").manual_seed(params.image_seed(0))
            image = plain(
                prompt=PROMPT,
                width=size,
                height=size,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                generator=generator,
            ).images[0]
        images[size] = np.asarray(image)
    if controller is not None:
        controller.prepare("off", args.steps)  # releases cache-dit's hold on this pipeline
    return images


def kernel_breakdown(engine: Any, width: int, height: int, steps: int, cache: str) -> dict[str, Any]:
    """Seconds of CUDA kernel time per kind over one image on rank 0 (collectives, attention, GEMM...)."""
    return kernel_seconds(lambda: timed(engine, width, height, steps, cache))


def main(argv: list[str] | None = None) -> int:
    from worker.group import GroupEngine, GroupLauncher

    parser = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__)
    parser.add_argument("--num-gpus", type=int, required=True)
    parser.add_argument("--ulysses-degree", type=int)
    parser.add_argument("--ring-degree", type=int)
    parser.add_argument("--tp-size", type=int, default=1, help="shard the T5 text encoder too")
    parser.add_argument("--sp-runtime", default="auto", choices=["auto", "cache-dit", "diffusers"])
    parser.add_argument("--ulysses-async", action="store_true", help="cache-dit's async Ulysses")
    parser.add_argument("--parallel-vae", action="store_true", help="split the decode over the group")
    parser.add_argument(
        "--cache",
        default="off",
        choices=["off", "default", "slow", "medium", "fast", "ultra"],
        help="time this Cache-DiT preset (masks: static policy; default: the FLUXGATE_CACHE_DIT_* knobs)",
    )
    parser.add_argument("--attention-backend")
    parser.add_argument("--quantize", default="none", choices=["none", "fp8"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--extra-res", type=int, action="append", default=[], help="also time this size")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-first",
        action="store_true",
        help="the first timed job under the profiler (rank 0): where the first job after the warm-up waits",
    )
    parser.add_argument("--overlap", action="store_true", help="inductor's compute/communication reordering")
    parser.add_argument(
        "--unpacked-exchange",
        action="store_true",
        help="Ulysses' query, key and value in three all-to-alls, as diffusers sends them",
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="the single blocks' symmetric exchanges one after the other, not beside their MLP GEMMs",
    )
    parser.add_argument(
        "--nccl-exchange",
        action="store_true",
        help="Ulysses' packed exchanges through NCCL's all-to-all, not symmetric memory (the default)",
    )
    parser.add_argument(
        "--skip-guards",
        action="store_true",
        help="after the warm-up, skip evaluating the compiled blocks' guards (host-overhead experiment)",
    )
    parser.add_argument(
        "--qk-rope", action="store_true", help="the fused query/key norm + rotary processor (not with async)"
    )
    parser.add_argument(
        "--no-epilogues", action="store_true", help="keep the MLPs' GELU out of the GEMMs' epilogues"
    )
    parser.add_argument(
        "--whole",
        choices=["default", "reduce-overhead"],
        help="compile the whole transformer in this mode, not the regions (host-overhead experiment)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="no CUDA graphs (the worker's flag)")
    parser.add_argument(
        "--no-compile-vae",
        action="store_true",
        help="the VAE's decoder eager under --compile (the worker's flag)",
    )
    parser.add_argument(
        "--no-fused-qk-norm-rope",
        action="store_true",
        help="inductor's query/key norm + rotary, not the fused kernel (the worker's flag)",
    )
    parser.add_argument(
        "--no-fa4-attention",
        action="store_true",
        help="SDPA's cuDNN attention, not FlashAttention-4's (the worker's flag)",
    )
    parser.add_argument(
        "--no-precompute-modulation",
        action="store_true",
        help="project the modulation at every step (the worker's flag)",
    )
    parser.add_argument("--output-file")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU ranks (gloo), to check")
    args = parser.parse_args(argv)
    if args.cache != "off" and args.sp_runtime == "diffusers":
        parser.error("--cache needs --sp-runtime cache-dit: diffusers' context parallelism runs no presets")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    sizes = [args.res, *args.extra_res]
    if args.overlap:
        os.environ["BENCH_COMM_OVERLAP"] = "1"
    if args.skip_guards:
        os.environ["BENCH_SKIP_GUARDS"] = "1"
    if args.qk_rope:
        if args.ulysses_async:
            parser.error("--qk-rope replaces the attention processor that --ulysses-async patches")
        os.environ["BENCH_QK_ROPE"] = "1"
    if args.unpacked_exchange:
        os.environ["BENCH_UNPACKED_EXCHANGE"] = "1"
    if args.no_overlap:
        os.environ["BENCH_NO_OVERLAP"] = "1"
    if args.whole:
        if args.compile:
            parser.error("--whole replaces --compile's regional compile: pass one of them")
        os.environ["BENCH_WHOLE_COMPILE"] = args.whole
    options = EngineOptions(
        num_gpus=args.num_gpus,
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        tp_size=args.tp_size,
        sp_runtime=args.sp_runtime,
        ulysses_async=args.ulysses_async,
        parallel_vae=args.parallel_vae,
        quantize=args.quantize,
        attention_backend=args.attention_backend,
        compile=args.compile,
        compile_vae=not args.no_compile_vae,
        gemm_epilogues=not args.no_epilogues,
        cuda_graphs=not args.no_cuda_graphs,
        fused_qk_norm_rope=not args.no_fused_qk_norm_rope,
        fa4_attention=not args.no_fa4_attention,
        precompute_modulation=not args.no_precompute_modulation,
        symmetric_exchange=not args.nccl_exchange,
        device="cpu" if args.smoke else "cuda",
        warmup_resolutions=",".join(f"{size}x{size}" for size in sizes),
    )
    # "auto" resolved as the worker resolves it, with a preset counting as the model's presets
    options = options.model_copy(update={"sp_runtime": options.resolved_sp_runtime(args.cache != "off")})
    gpus = torch.cuda.device_count()
    report: dict[str, Any] = {
        "device": f"{gpus}x {torch.cuda.get_device_name(0)}" if gpus else "cpu",
        "torch": torch.__version__,
        "layout": {**dict(zip(("ulysses", "ring"), options.layout, strict=True)), "tp": args.tp_size},
        "sp_runtime": options.sp_runtime,
        "ulysses_async": args.ulysses_async,
        "parallel_vae": args.parallel_vae,
        "cache": args.cache,
        "compile": args.compile,
        "comm_overlap": args.overlap,
        "skip_guards": args.skip_guards,
        "whole": args.whole,
        "epilogues": not args.no_epilogues,
        "qk_rope": args.qk_rope,
        "packed_exchange": not args.unpacked_exchange,
        "symmetric_exchange": not (args.nccl_exchange or args.unpacked_exchange),
        "exchange_beside_gemms": not (args.no_overlap or args.nccl_exchange or args.unpacked_exchange),
        "cuda_graphs": not args.no_cuda_graphs,
        "compile_vae": args.compile and not args.no_compile_vae,
        "fused_qk_norm_rope": not args.no_fused_qk_norm_rope,
        "fa4_attention": not args.no_fa4_attention,
        "precompute_modulation": not args.no_precompute_modulation,
        "quantize": args.quantize,
        "steps": args.steps,
    }
    if not args.smoke:
        torch.cuda.set_device(0)
    model = BenchModel(args.smoke, args.cache)
    reference = one_gpu_images(model, args, sizes)  # before the group forms: one device, no collectives
    if not args.smoke:
        torch.cuda.empty_cache()

    started = time.perf_counter()
    launcher = GroupLauncher.local(args.num_gpus, "cpu" if args.smoke else "cuda", timeout_s=600)
    channel = launcher.start(model, options, group_loader)
    engine = GroupEngine(group_loader(model, options, {}), channel, launcher.spec.keepalive_s, launcher)
    engine.start()
    report["load_and_warmup_s"] = round(time.perf_counter() - started, 1)
    for size in sizes:
        seconds, phases, output = [], [], None
        for repeat in range(args.repeats):
            marks: list[float] = []
            if args.profile_first and repeat == 0 and size == sizes[0]:
                elapsed, output, report["first_job_profile_rank0"] = profiled(
                    engine, size, args.steps, args.cache, marks
                )
            else:
                elapsed, output = timed(engine, size, size, args.steps, args.cache, marks)
            seconds.append(round(elapsed, 3))
            phases.append(host_phases(elapsed, marks))
        assert output is not None
        image = np.asarray(output.images[0])
        report[f"{size}"] = {
            "seconds": seconds,
            "median_s": statistics.median(seconds),
            "host_phases": phases,
            "cached_steps": output.cached_steps,
            "psnr_vs_one_gpu_db": round(psnr(image, reference[size]), 2),
            "max_pixel_difference_vs_one_gpu": int(np.abs(image.astype(np.int16) - reference[size]).max()),
        }
        print(json.dumps({size: report[f"{size}"]}), flush=True)
    if gpus:
        report["peak_memory_gb_rank0"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report["dynamo_graphs_rank0"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report["graph_breaks_rank0"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    if args.profile and gpus:
        report["kernel_seconds_rank0"] = kernel_breakdown(engine, args.res, args.res, args.steps, args.cache)
    print("RESULT " + json.dumps(report), flush=True)
    if args.output_file:
        with open(args.output_file, "w") as file:
            json.dump(report, file, indent=2)
    engine.stop()
    launcher.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
