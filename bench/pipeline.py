"""GPU pipeline benchmark: the worker's engine on FLUX.1-dev's architecture with random weights.

    python -m bench.pipeline --variants eager,cudnn,compiled --res 1024 --steps 28 --output-file out.json

Each variant builds a fresh pipeline on the GPU (same torch seed, so the same weights), applies the
worker's load-time options through the same code as ``fluxgate worker`` (``FluxEngine.from_pipeline``),
warms it up, then times whole images (text encoding, denoising, VAE decode, PIL conversion) and one
transformer step (CUDA events, median). Images are noise; the cost is the real one. Variants run in
the order given; one that fails is reported and the next one runs.

Per variant: ``prepare_s`` (placement, quantization), ``warmup_s`` (compilation: with
``FLUXGATE_COMPILE_CACHE_DIR`` set, run twice in fresh processes for the cold and the warm restart),
the compile cache's hits and misses, resident and peak GPU memory. fp8 variants (and all with
``--reference all``) also report their output's difference against a bf16 image of the same weights
and seed generated in the same process (``bench.fidelity``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._inductor.config

from bench.fidelity import Capture, capture, difference, weights_fingerprint
from bench.gemm_check import SETTINGS, blas_setting
from bench.profiling import kernel_seconds
from bench.random_flux import build_flux1_dev
from bench.whole import compile_whole
from shared.schemas import GenerationParams
from worker.engine import FluxEngine, internal_params
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.cache_graphs import SETTINGS_ATTRIBUTE
from worker.optimizations.cuda_graphs import GraphedCalls
from worker.optimizations.epilogues import EpilogueSingleBlock, apply_gemm_epilogues
from worker.optimizations.fp8_attention_processor import Fp8FluxAttnProcessor
from worker.optimizations.fp8_mlp import apply_fp8_mlp_epilogues
from worker.optimizations.fused_qkv import fused_buffers
from worker.optimizations.quack_gating import GatedFeedForwardBlock
from worker.optimizations.quack_gelu import QuackGELU, QuackGELUSingleBlock
from worker.optimizations.quack_qk import QuackQKFluxAttnProcessor
from worker.optimizations.quantize import Fp8Config, apply_fp8, float8_on_cpu
from worker.options import DType, EngineOptions

SEED = 0  # torch seed before every build: every variant gets the same random weights


@dataclass(frozen=True)
class Variant:
    """Engine options and a cache preset; alternatives under test add a change the benchmark makes first.

    Cache presets: cache-dit DBCache F1B0 with a fixed compute/cache step schedule (random weights
    never pass a residual threshold, so masks it is). ``fp8_recipe``: another fp8 recipe than
    ``--quantize fp8``'s, applied by the benchmark before the engine's options (then compile).
    ``whole``: one graph for the whole transformer instead of the worker's regional compile (cross-block
    fusion; with "reduce-overhead", a CUDA graph per step; ``bench.whole``). ``epilogues``: the MLPs'
    GELU in the GEMMs' epilogues for a whole-transformer compile (the regional compile has them unless
    ``gemm_epilogues`` is off: ``worker.optimizations.epilogues``). ``inductor``: inductor settings.
    """

    options: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None
    fp8_recipe: Fp8Config | None = None
    fuse_qkv: bool = False
    whole: str | None = None  # compile the whole transformer as one graph with this mode ("default", ...)
    epilogues: bool = False
    inductor: dict[str, Any] = field(default_factory=dict)  # torch._inductor.config while it compiles
    fp8_mlp: bool = False  # worker.optimizations.fp8_mlp's kernels for the fp8 MLPs' GELU + quantization
    # --attention-fp8 with its e4m3 output dequantized before the double blocks' fp8 output projections
    fp8_attention_dequant: bool = False
    head_major_qk: bool = False  # the fused query/key kernel writing head-major (its layout before lease 49)
    qk_tokens: int | None = None  # tokens a program of the fused query/key kernel, None: the worker's
    # (qk_norm_rope.TOKENS_PER_PROGRAM)
    # torch's BLAS library and bf16 split-K setting while the variant runs (bench.gemm_check.SETTINGS)
    blas: str | None = None
    # the double blocks' value projections writing the joint value in place (worker.optimizations.joint_value)
    joint_value: bool = False
    # the fused projections' query and key normed and rotated in a launch each, the worker's way before
    # ``qk_pair_norm_rope`` did both in one
    unpaired_qk: bool = False
    # a double block's fused image-stream projection through quack's GEMM
    # (worker.optimizations.quack_projection)
    quack_projection: bool = False
    # the single blocks' proj_out: its second GEMM adds into the first's output (epilogues.accumulate_mm,
    # the worker's since lease 64) or the gating kernel adds both; None: the worker's
    accumulate: bool | None = None

    @property
    def fp8(self) -> bool:
        return self.options.get("quantize", "none") != "none" or self.fp8_recipe is not None


FP8 = {"quantize": "fp8"}
COMPILED = {"compile": True}
NO_WAVES_NO_ROWS = {"fa4_waves": False, "image_rows_last": False}

VARIANTS: dict[str, Variant] = {
    "eager": Variant(),
    "cudnn": Variant({"attention_backend": "_native_cudnn"}),
    "compiled": Variant(COMPILED),
    "cudnn-compiled": Variant({"attention_backend": "_native_cudnn", "compile": True}),
    "autotune": Variant({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}),
    "offload": Variant({"dit_cpu_offload": True, "text_encoder_cpu_offload": True, "pin_cpu_memory": True}),
    # the worker's default copies two blocks at a time; g1 and g4 measure one and four
    "offload-budget-24": Variant({"gpu_memory_budget_gb": 24, "pin_cpu_memory": True}),
    "offload-budget-24-g1": Variant(
        {"gpu_memory_budget_gb": 24, "pin_cpu_memory": True, "offload_blocks_per_group": 1}
    ),
    "offload-budget-24-g4": Variant(
        {"gpu_memory_budget_gb": 24, "pin_cpu_memory": True, "offload_blocks_per_group": 4}
    ),
    "cache-medium": Variant(COMPILED, "medium"),
    "cache-fast": Variant(COMPILED, "fast"),
    "cache-ultra": Variant(COMPILED, "ultra"),
    # the double blocks' joint attention value written in place by its projections (lease 65: no gain)
    "compiled-joint-value": Variant(COMPILED, joint_value=True),
    "cache-fast-joint-value": Variant(COMPILED, "fast", joint_value=True),
    # proj_out's partial sums both added by the gating kernel (the worker's until lease 64)
    "compiled-no-accumulate": Variant(COMPILED, accumulate=False),
    "cache-fast-no-accumulate": Variant(COMPILED, "fast", accumulate=False),
    # Cache-DiT's block runs without their CUDA graphs (worker.optimizations.cache_graphs; before lease 59)
    "cache-fast-no-graphs": Variant({**COMPILED, "cuda_graphs": False}, "fast"),
    # --quantize fp8: per-row scales, the repeated blocks' linears minus their modulation linears
    "fp8": Variant(FP8),
    "fp8-compiled": Variant({**FP8, **COMPILED}),
    "fp8-cache-fast": Variant({**FP8, **COMPILED}, "fast"),
    # alternatives, for the device run to decide
    "fp8-tensor-compiled": Variant(COMPILED, fp8_recipe=Fp8Config(granularity="tensor")),
    "fp8-modulation-compiled": Variant(COMPILED, fp8_recipe=Fp8Config(modulation=True)),
    "fp8-all-compiled": Variant(COMPILED, fp8_recipe=Fp8Config(layers="all")),  # stock's layer choice
    "fp8-fused-compiled": Variant({**FP8, **COMPILED}, fuse_qkv=True),
    "fp8-autotune": Variant({**FP8, "compile": True, "compile_mode": "max-autotune-no-cudagraphs"}),
    # one graph for the transformer, its time embedder eager (bench.whole: eager's bf16 roundings kept)
    "whole-compiled": Variant(whole="default"),
    "whole-graphs": Variant(whole="reduce-overhead"),
    "fp8-whole-graphs": Variant(FP8, whole="reduce-overhead"),
    "whole-graphs-epilogues": Variant(whole="reduce-overhead", epilogues=True),
    # --compile's fused query/key norm + rotary processor and compiled VAE decoder (both on by default since
    # lease 25), each left out, and both: the regional compile as it was after lease 22
    "compiled-no-qkrope": Variant({**COMPILED, "fused_qk_norm_rope": False}),
    "compiled-no-vae": Variant({**COMPILED, "compile_vae": False}),
    "compiled-neither": Variant({**COMPILED, "fused_qk_norm_rope": False, "compile_vae": False}),
    "fp8-compiled-neither": Variant({**FP8, **COMPILED, "fused_qk_norm_rope": False, "compile_vae": False}),
    # --compile's CUDA graph replay of the transformer's steps left out (worker.optimizations.cuda_graphs)
    "compiled-no-graphs": Variant({**COMPILED, "cuda_graphs": False}),
    "fp8-compiled-no-graphs": Variant({**FP8, **COMPILED, "cuda_graphs": False}),
    # the regional compile as it was before the GEMM epilogues became its default (lease 22)
    "compiled-no-epilogues": Variant({**COMPILED, "gemm_epilogues": False}),
    "compiled-wide-rows": Variant({**COMPILED, "one_pass_rows": 16384}),
    "fp8-compiled-wide-rows": Variant({**FP8, **COMPILED, "one_pass_rows": 16384}),
    # 4,096: the blocks' LayerNorms (3,072) in one pass, fp8's MLP rows (12,288, 15,360) as inductor has them
    "compiled-wide-rows-4k": Variant({**COMPILED, "one_pass_rows": 4096}),
    "fp8-compiled-wide-rows-4k": Variant({**FP8, **COMPILED, "one_pass_rows": 4096}),
    # diffusers' fused query/key/value projections (one GEMM each for the image's and the text's q, k and v;
    # a copy of their weights: +4 GB, for the timing only)
    "compiled-fused-qkv": Variant(COMPILED, fuse_qkv=True),
    # inductor's own 1,024-element one-pass rows, as before --one-pass-rows (4,096) became the default
    "compiled-inductor-rows": Variant({**COMPILED, "one_pass_rows": 0}),
    "fp8-compiled-fp8-attention-inductor-rows": Variant(
        {**FP8, **COMPILED, "attention_fp8": True, "one_pass_rows": 0}
    ),
    # fp8 with the MLPs' GELU + per-row quantization as Fluxgate's kernels (worker.optimizations.fp8_mlp)
    "fp8-compiled-mlp-kernel": Variant({**FP8, **COMPILED}, fp8_mlp=True),
    # --attention-fp8: FLUX.1's attention in fp8 through cuDNN (worker.optimizations.fp8_attention)
    "fp8-compiled-fp8-attention": Variant({**FP8, **COMPILED, "attention_fp8": True}),
    "fp8-compiled-fp8-attention-mlp-kernel": Variant(
        {**FP8, **COMPILED, "attention_fp8": True}, fp8_mlp=True
    ),
    "fp8-compiled-fp8-attention-dequant": Variant(
        {**FP8, **COMPILED, "attention_fp8": True}, fp8_attention_dequant=True
    ),
    "compiled-fp8-attention": Variant({**COMPILED, "attention_fp8": True}),
    "fp8-cache-fast-fp8-attention": Variant({**FP8, **COMPILED, "attention_fp8": True}, "fast"),
    # the adaLN modulation projected at every step, as before it was precomputed per job (the default now:
    # worker.optimizations.modulation)
    "compiled-per-step-modulation": Variant({**COMPILED, "precompute_modulation": False}),
    "fp8-compiled-fp8-attention-per-step-modulation": Variant(
        {**FP8, **COMPILED, "attention_fp8": True, "precompute_modulation": False}
    ),
    "cache-fast-per-step-modulation": Variant({**COMPILED, "precompute_modulation": False}, "fast"),
    # the fused query/key kernel writing head-major, as before lease 49 (the attention's output then copied
    # to token-major before its projection, 57 copies a step)
    "compiled-head-major-qk": Variant(COMPILED, head_major_qk=True),
    # the fused query/key kernel with 1 or 2 tokens a program (the worker's takes 4 since lease 53)
    "compiled-qk-tokens-1": Variant(COMPILED, qk_tokens=1),  # the kernel before lease 53
    "compiled-qk-tokens-2": Variant(COMPILED, qk_tokens=2),
    # cuBLASLt for every GEMM, and its split-K reductions in fp32 in a kernel of their own, or none (lease 53:
    # the same kernels and memsets as the default; not adopted)
    "compiled-cublaslt": Variant(COMPILED, blas="cublaslt"),
    "compiled-fp32-split-k": Variant(COMPILED, blas="cublaslt, fp32 split-K"),
    "compiled-no-split-k": Variant(COMPILED, blas="cublaslt, no split-K"),
    # SDPA's cuDNN kernel, not FlashAttention-4's (the worker's default where it runs, since lease 85)
    "compiled-no-fa4": Variant({**COMPILED, "fa4_attention": False}),
    # FA4's calls unsplit, their last wave partly idle (worker.optimizations.fa4_waves; the default splits)
    "compiled-no-fa4-waves": Variant({**COMPILED, "fa4_waves": False}),
    "cache-fast-no-fa4-waves": Variant({**COMPILED, "fa4_waves": False}, "fast"),
    # the last single block's text rows computed too, as the model discards them (worker.optimizations.
    # epilogues.image_rows_last; the default computes its image rows only)
    "compiled-no-image-rows-last": Variant({**COMPILED, "image_rows_last": False}),
    # neither of the two: the worker's default before them
    "compiled-no-waves-no-rows": Variant({**COMPILED, **NO_WAVES_NO_ROWS}),
    "cache-fast-no-waves-no-rows": Variant({**COMPILED, **NO_WAVES_NO_ROWS}, "fast"),
    # each single block gating its own output, not in the next block's norm kernel (worker.optimizations.
    # epilogues.defer_gating; the default defers it in calls without Cache-DiT hooks)
    "compiled-no-deferred-gating": Variant({**COMPILED, "deferred_gating": False}),
    # the compiled decoder's GroupNorm statistics from inductor's reduction (worker.optimizations.group_stats;
    # the default reads whole pixels), alone and with the gating undeferred too
    "compiled-inductor-vae-stats": Variant({**COMPILED, "vae_group_stats": False}),
    "compiled-no-deferred-gating-inductor-vae-stats": Variant(
        {**COMPILED, "deferred_gating": False, "vae_group_stats": False}
    ),
    # three GEMMs a stream for the query, key and value, and the double blocks' values concatenated (the
    # worker's default before worker.optimizations.fused_qkv)
    "compiled-unfused-qkv": Variant({**COMPILED, "fused_qkv": False}),
    "cache-fast-unfused-qkv": Variant({**COMPILED, "fused_qkv": False}, "fast"),
    # the fused projections' query and key normed and rotated in two launches (the worker's before
    # qk_pair_norm_rope)
    "compiled-unpaired-qk": Variant(COMPILED, unpaired_qk=True),
    # the double blocks' feed-forward gating in quack's GEMM epilogue (worker.optimizations.quack_gating)
    "compiled-quack-gating": Variant({**COMPILED, "quack_gating": True}),
    # the query/key projections normed and rotated in quack's GEMM epilogue (worker.optimizations.quack_qk)
    "compiled-quack-qk": Variant({**COMPILED, "quack_qk": True}),
    # both quack epilogues
    "compiled-quack": Variant({**COMPILED, "quack_gating": True, "quack_qk": True}),
    # the feed-forwards' GELU in quack's GEMM epilogue (worker.optimizations.quack_gelu), alone and with the
    # gating beside it
    "compiled-quack-gelu": Variant({**COMPILED, "quack_gelu": True}),
    "compiled-quack-gelu-gating": Variant({**COMPILED, "quack_gelu": True, "quack_gating": True}),
    "cache-fast-quack-gelu": Variant({**COMPILED, "quack_gelu": True}, "fast"),
    "cache-fast-quack-gelu-gating": Variant({**COMPILED, "quack_gelu": True, "quack_gating": True}, "fast"),
    # the double blocks' image-stream q/k/v projection through quack's GEMM
    "compiled-quack-projection": Variant(COMPILED, quack_projection=True),
    # the worker's default before the two quack epilogues (the GELU and the gating) became its default
    "compiled-no-quack": Variant({**COMPILED, "quack_gelu": False, "quack_gating": False}),
    "cache-fast-no-quack": Variant({**COMPILED, "quack_gelu": False, "quack_gating": False}, "fast"),
    # all three quack epilogues: the GELU, the gating, the query/key norms and RoPE
    "compiled-quack-all": Variant({**COMPILED, "quack_gelu": True, "quack_gating": True, "quack_qk": True}),
    "cache-fast-no-fa4": Variant({**COMPILED, "fa4_attention": False}, "fast"),
    "fp8-compiled-no-fa4": Variant({**FP8, **COMPILED, "fa4_attention": False}),
    "compiled-cd": Variant(COMPILED, inductor={"coordinate_descent_tuning": True}),
    # inductor's Triton kernels with Programmatic Dependent Launch (Hopper): each launches while the kernel
    # before it drains and waits for its results in-kernel, so the launch latency between them is hidden
    "compiled-pdl": Variant(COMPILED, inductor={"triton.enable_pdl": True}),
    # inductor's combo kernels: independent kernels of a graph (a double block's text and image norms and
    # gatings) launched as one
    "compiled-combo": Variant(COMPILED, inductor={"combo_kernels": True}),
    "compiled-quack-pdl": Variant(
        {**COMPILED, "quack_gating": True, "quack_qk": True}, inductor={"triton.enable_pdl": True}
    ),
    "fp8-compiled-cd": Variant({**FP8, **COMPILED}, inductor={"coordinate_descent_tuning": True}),
}


def transformer_step_s(transformer: Any, width: int, height: int, repeats: int = 10) -> float:
    """Median time of one transformer forward at the pipeline's shapes (CUDA events)."""
    device, dtype = "cuda", torch.bfloat16
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


def image_params(
    width: int, height: int, steps: int, cache: str | None, args: argparse.Namespace | None = None
) -> GenerationParams:
    """The benchmark's job; ``args`` may make it true CFG (``--true-cfg``) or a job of ``--images``."""
    params = internal_params(
        width, height, steps, cache or "off", prompt="a cat holding a sign that says hello world"
    )
    if args is None:
        return params
    changes: dict[str, Any] = {"num_images": args.images}
    if args.true_cfg is not None:
        changes.update(negative_prompt="blurry, low quality", true_cfg_scale=args.true_cfg)
    return params.model_copy(update=changes)


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


def build(smoke: bool, fp8: bool) -> Any:
    """FLUX.1-dev's architecture on the GPU; ``--smoke`` takes the tiny pipeline on the CPU instead
    (in bf16 for fp8 variants: per-row fp8 quantizes bf16 weights)."""
    torch.manual_seed(SEED)
    if smoke:
        from worker.tiny_model import build_tiny_pipeline

        pipe: Any = build_tiny_pipeline("flux1", seed=SEED)
        return pipe.to(torch.bfloat16) if fp8 else pipe
    return build_flux1_dev("cuda")  # random init is fast on the GPU; offload variants then start on the CPU


def engine_options(variant: Variant, smoke: bool) -> tuple[dict[str, Any], EngineOptions]:
    overrides = dict(variant.options)
    if smoke:
        dropped = ("attention_backend", "pin_cpu_memory", "attention_fp8")  # fp8 attention needs --compile
        overrides = {k: v for k, v in overrides.items() if k not in dropped}
        overrides["compile"] = False
    dtype: DType = "bfloat16" if not smoke or variant.fp8 else "float32"
    return overrides, EngineOptions(device="cpu" if smoke else "cuda", dtype=dtype, **overrides)


def fp8_layer_count(transformer: torch.nn.Module) -> int:
    """Linear layers whose weight is a torchao float8 tensor."""
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    return sum(type(m.weight).__name__ == "Float8Tensor" for m in linears)


def compile_cache_counters() -> dict[str, int]:
    """torch's FX-graph and AOTAutograd cache counters (hits on a warm restart)."""
    from torch._dynamo.utils import counters

    names = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")}
    names["aot_autograd"] = ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")
    return {name: counters[group][name] for group, keys in names.items() for name in keys}


def reference_capture(
    pipe: Any, device: torch.device, params: GenerationParams, references: dict[Any, Capture]
) -> Capture:
    """The bf16 eager image of this build, generated once per process and per (weights, shape)."""
    job = (params.num_inference_steps, params.num_images, params.negative_prompt, params.true_cfg_scale)
    key = (weights_fingerprint(pipe.transformer), params.width, params.height, job)
    if key not in references:
        pipe.set_progress_bar_config(disable=True)
        references[key] = capture(FluxEngine(pipe, device), params)
    return references[key]


def set_on_processors(transformer: Any, kind: type, name: str, value: Any, exact: bool = False) -> None:
    """Set ``name`` to ``value`` on every attention processor that is a ``kind`` (exactly that class, with
    ``exact``)."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is kind if exact else isinstance(processor, kind):
            setattr(processor, name, value)


def prepare_engine(variant: Variant, pipe: Any, options: EngineOptions, device: torch.device) -> FluxEngine:
    """The benchmark's own changes for alternatives, then the worker's load-time options."""
    if variant.fuse_qkv:
        pipe.transformer.fuse_qkv_projections()
    if variant.fp8_recipe is not None:
        apply_fp8(pipe, variant.fp8_recipe, device)
    engine = FluxEngine.from_pipeline(pipe, options, device, cache_factory(variant.cache))
    if variant.epilogues:  # after fp8 (its layers keep their forward), before the first call compiles
        apply_gemm_epilogues(pipe.transformer)
    if variant.fp8_mlp:  # after fp8, before the first call compiles
        apply_fp8_mlp_epilogues(pipe.transformer)
    # before the first call traces the processors
    fused = qk_module.FusedQKFluxAttnProcessor
    if variant.fp8_attention_dequant:
        set_on_processors(pipe.transformer, Fp8FluxAttnProcessor, "project_e4m3", False)
    if variant.head_major_qk:
        set_on_processors(pipe.transformer, fused, "token_major", False)
    if variant.joint_value:  # the fused processor itself, not its subclasses (fp8's projects its own way)
        set_on_processors(pipe.transformer, fused, "joint_value", True, exact=True)
    if variant.unpaired_qk:
        set_on_processors(pipe.transformer, fused, "paired_qk", False)
    if variant.quack_projection:
        set_on_processors(pipe.transformer, fused, "quack_projection", True)
    if variant.accumulate is not None:  # before the first call traces the blocks
        singles = [m for m in pipe.transformer.modules() if isinstance(m, EpilogueSingleBlock)]
        for module in singles:
            module.accumulate = variant.accumulate
        print(f"single blocks with accumulate={variant.accumulate}: {len(singles)}")
    if variant.whole is not None:
        compile_whole(pipe.transformer, variant.whole)
    return engine


def run_variant(name: str, args: argparse.Namespace, references: dict[Any, Capture]) -> dict[str, Any]:
    """Build, prepare, warm up and time one variant; fp8 on the CPU (``--smoke``) only checks the wiring."""
    variant = VARIANTS[name]
    overrides, options = engine_options(variant, args.smoke)
    result: dict[str, Any] = {"variant": name, "options": overrides, "cache": variant.cache}
    changes = {
        "fp8_recipe": variant.fp8_recipe and str(variant.fp8_recipe),
        "fuse_qkv": variant.fuse_qkv,
        "whole": variant.whole,
        "epilogues": variant.epilogues,
        "inductor": variant.inductor,
        "fp8_mlp": variant.fp8_mlp,
        "fp8_attention_dequant": variant.fp8_attention_dequant,
        "head_major_qk": variant.head_major_qk,
        "accumulate": variant.accumulate,
        "joint_value": variant.joint_value,
        "unpaired_qk": variant.unpaired_qk,
        "quack_projection": variant.quack_projection,
        "qk_tokens": variant.qk_tokens,
        "blas": variant.blas,
        "sdpa_first": args.sdpa_first,
    }
    if any(changes.values()):
        result["bench_changes"] = changes
    inductor = torch._inductor.config.patch(variant.inductor)
    worker_tokens = qk_module.TOKENS_PER_PROGRAM  # read at each call of the kernel
    qk_module.TOKENS_PER_PROGRAM = variant.qk_tokens or worker_tokens
    try:
        with inductor, sdpa_first(args.sdpa_first), blas(None if args.smoke else variant.blas):
            result.update(run_prepared(variant, args, references, overrides, options))
    finally:
        qk_module.TOKENS_PER_PROGRAM = worker_tokens
    return result


def blas(setting: str | None) -> contextlib.AbstractContextManager[None]:
    """One of ``bench.gemm_check.SETTINGS`` while a variant builds, compiles and runs (its CUDA graphs keep
    the GEMM kernels chosen at capture). The CPU (``--smoke``) has no cuBLASLt: there it is left out."""
    if setting is None:
        return contextlib.nullcontext()
    library, reduction = SETTINGS[setting]
    return blas_setting(library, reduction)


def sdpa_first(backend: str | None) -> contextlib.AbstractContextManager[None]:
    """torch's SDPA priority with ``backend`` first, every backend still enabled (fallbacks stay)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, backend)
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first, *(other for other in rest if other != first)], set_priority=True)


def run_prepared(
    variant: Variant,
    args: argparse.Namespace,
    references: dict[Any, Capture],
    overrides: dict[str, Any],
    options: EngineOptions,
) -> dict[str, Any]:
    """Build, prepare, warm up and time ``variant`` (``run_variant``'s body, under its inductor settings)."""
    device = torch.device("cpu" if args.smoke else "cuda")
    result: dict[str, Any] = {}
    built = time.perf_counter()
    pipe = build(args.smoke, variant.fp8)
    result["build_s"] = round(time.perf_counter() - built, 1)
    reference = None
    if args.reference == "all" or (args.reference == "auto" and variant.fp8):
        plain = image_params(args.res, args.res, args.steps, None, args)
        reference = reference_capture(pipe, device, plain, references)
    if options.any_offload:
        pipe.to("cpu")
        if not args.smoke:
            torch.cuda.empty_cache()
    prepared = time.perf_counter()
    with float8_on_cpu() if args.smoke and variant.fp8 else contextlib.nullcontext():
        engine = prepare_engine(variant, pipe, options, device)
    result["prepare_s"] = round(time.perf_counter() - prepared, 1)
    if not args.smoke:
        result["resident_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    params = image_params(args.res, args.res, args.steps, variant.cache, args)
    result["modulation_tables"] = len(engine.modulation)  # transformers whose modulation is precomputed
    if args.table_bytes is not None:  # the modulation tables projected in chunks of this many bytes
        for tables in engine.modulation.values():
            tables.table_bytes = args.table_bytes
        result["modulation_table_bytes"] = args.table_bytes
    result["fp8_layers"] = fp8_layer_count(pipe.transformer)
    # attention modules whose processor attends through FlashAttention-4 (worker.optimizations.fa4_attention)
    processors = [getattr(module, "processor", None) for module in pipe.transformer.modules()]
    result["fa4_attention_modules"] = sum(bool(getattr(processor, "fa4", False)) for processor in processors)
    # attention modules projecting each stream's q/k/v with one GEMM (worker.optimizations.fused_qkv)
    result["fused_qkv_modules"] = sum(
        fused_buffers(module, "image") is not None for module in pipe.transformer.modules()
    )
    # double blocks gating their feed-forward in quack's GEMM epilogue (worker.optimizations.quack_gating)
    gated = [module for module in pipe.transformer.modules() if isinstance(module, GatedFeedForwardBlock)]
    result["quack_gated_blocks"] = len(gated)
    # feed-forwards taking their GELU in quack's GEMM epilogue (worker.optimizations.quack_gelu)
    result["quack_gelu_modules"] = sum(
        isinstance(module, (QuackGELU, QuackGELUSingleBlock)) for module in pipe.transformer.modules()
    )
    # single blocks computing their image rows only (the last one, where it applies)
    result["image_rows_blocks"] = sum(
        getattr(block, "image_rows_only", False) for block in pipe.transformer.single_transformer_blocks
    )
    # whether single blocks leave their gating to the next block's norm kernel (worker.optimizations.
    # epilogues.defer_gating: in calls without Cache-DiT hooks)
    result["deferred_gating"] = engine.defers_gating
    # attention modules whose FA4 calls split to fill the last wave (worker.optimizations.fa4_waves)
    result["fa4_split_modules"] = sum(getattr(processor, "fa4_wave_sms", 0) > 0 for processor in processors)
    # attention modules projecting their query and key in quack's epilogue (worker.optimizations.quack_qk)
    result["quack_qk_modules"] = sum(
        isinstance(processor, QuackQKFluxAttnProcessor) for processor in processors
    )
    compiled = options.compile or variant.whole is not None
    result.update(measure(engine, variant, args.repeats, params, compiled))
    # the restart figure: worker start to first image, beyond loading (here: building) the weights
    result["restart_s"] = round(result["prepare_s"] + result["warmup_s"] + result["seconds"][0], 1)
    if reference is not None:
        result["difference"] = difference(reference, capture(engine, params))
    if engine.graphs is not None:
        graphs = engine.graphs
        result["cuda_graphs"] = {"captured": len(graphs.captured), "refused": len(graphs.refused)}
    if engine.encoder_graphs:
        result["encoder_graphs"] = {name: len(g.captured) for name, g in engine.encoder_graphs.items()}
    projections = [t.graphs for t in engine.modulation.values() if isinstance(t.graphs, GraphedCalls)]
    if projections:
        result["modulation_graphs"] = sum(len(g.captured) for g in projections)
    block_graphs = getattr(pipe.transformer, SETTINGS_ATTRIBUTE, None)
    if block_graphs is not None:
        result["cache_block_graphs"] = block_graphs.counts()
    if args.profile:
        result["kernel_seconds"] = kernel_seconds(lambda: engine.generate(params, lambda step, total: None))
    if not options.any_offload and variant.cache is None and not args.smoke:
        # through the engine's CUDA graphs where it has them (a graph of its own: the inputs' dtypes differ)
        result["step_s"] = round(transformer_step_s(engine.graphs or pipe.transformer, args.res, args.res), 4)
    return result


def measure(
    engine: FluxEngine, variant: Variant, repeats: int, params: GenerationParams, engine_compiled: bool
) -> dict[str, Any]:
    """Warm-up (compilation) with the compile cache's counters, then ``repeats`` timed images."""
    result: dict[str, Any] = {}
    counters = compile_cache_counters()
    warm = time.perf_counter()
    size = [(params.width, params.height)]
    engine.warmup(size, [variant.cache or "off"], steps=params.num_inference_steps if variant.cache else 2)
    result["warmup_s"] = round(time.perf_counter() - warm, 1)
    if engine_compiled:
        after = compile_cache_counters()
        result["compile_cache"] = {name: after[name] - counters[name] for name in after}
    seconds, cached = [], []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        output = engine.generate(params, lambda step, total: None)
        synchronize()
        seconds.append(time.perf_counter() - started)
        cached.append(output.cached_steps)
        result["peak_memory_gb"] = round((output.peak_memory_mb or 0) / 1024, 2)
    result["seconds"] = [round(s, 3) for s in seconds]
    result["median_s"] = round(statistics.median(seconds), 3)
    result["cached_steps"] = cached
    return result


def release(smoke: bool) -> None:
    """Drop the last variant's compiled graphs (they hold its weights) and free its memory; the next
    variant compiles its own (a disk cache may still hit)."""
    torch._dynamo.reset()
    gc.collect()
    if not smoke:
        torch.cuda.empty_cache()


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'variant':<22}{'s/image':>9}{'step s':>8}{'warmup':>8}{'peak GB':>8}{'cached':>7}{'PSNR dB':>9}")
    for result in results:
        if "error" in result:
            print(f"{result['variant']:<22} failed: {result['error']}")
            continue
        psnr = result.get("difference", {}).get("image_psnr_db", "-")
        print(
            f"{result['variant']:<22}{result['median_s']:>9}{result.get('step_s', '-'):>8}"
            f"{result['warmup_s']:>8}{result['peak_memory_gb']:>8}{result['cached_steps'][-1]:>7}"
            f"{psnr if psnr is not None else 'same':>9}"
        )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="eager,cudnn,cudnn-compiled", help=f"from: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--reference",
        choices=["auto", "all", "none"],
        default="auto",
        help="compare against the bf16 image of the same seed: fp8 variants (auto), every variant, none",
    )
    parser.add_argument("--images", type=int, default=1, help="images per job (one pipeline call)")
    parser.add_argument(
        "--true-cfg", type=float, help="true CFG at this scale, with a negative prompt (two calls a step)"
    )
    parser.add_argument(
        "--table-bytes",
        type=int,
        help="cap the precomputed modulation tables at this many bytes (small: steps projected in chunks)",
    )
    parser.add_argument("--output-file")
    parser.add_argument("--profile", action="store_true", help="CUDA kernel time by kind over one image")
    parser.add_argument(
        "--sdpa-first",
        choices=["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"],
        help="put this SDPA backend first in torch's priority order for every variant (the rest stay on)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny pipeline on the CPU: checks the script only"
    )
    args = parser.parse_args(argv)
    args.names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    report: dict[str, Any] = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "res": args.res,
        "steps": args.steps,
        "variants": [],
    }
    references: dict[Any, Capture] = {}
    for name in args.names:
        try:
            result = run_variant(name, args, references)
        except Exception as error:  # one broken variant must not cost the rest of a device lease
            traceback.print_exc()
            result = {"variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        release(args.smoke)
        report["variants"].append(result)
        print("RESULT " + json.dumps(result), flush=True)
        if args.output_file:
            with open(args.output_file, "w") as handle:
                json.dump(report, handle, indent=1)
    print_table(report["variants"])
    return 1 if any("error" in result for result in report["variants"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
