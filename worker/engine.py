"""The FLUX engine: one diffusers pipeline loaded once per process, optimised at load, run per job."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from shared.schemas import GenerationParams
from worker.noise import noise_drawn_ahead
from worker.optimizations import fa4_waves
from worker.optimizations.attention import apply_attention_backend
from worker.optimizations.compile import CompileConfig, apply_regional_compile
from worker.optimizations.cuda_graphs import (
    CudaRecorder,
    GraphConfig,
    GraphedCalls,
    StepGraphs,
    apply_step_graphs,
)
from worker.optimizations.epilogues import apply_gemm_epilogues, defer_gating, image_rows_last
from worker.optimizations.fa4_attention import fa4_unavailable
from worker.optimizations.fp8_attention import check_fp8_attention_supported
from worker.optimizations.fp8_attention_processor import apply_fp8_attention
from worker.optimizations.fused_qkv import apply_fused_qkv
from worker.optimizations.group_stats import apply_group_stats
from worker.optimizations.modulation import ModulationTables, Schedule, apply_modulation_tables
from worker.optimizations.offload import OffloadConfig, apply_offload
from worker.optimizations.qk_norm_rope import (
    FusedQKFluxAttnProcessor,
    apply_fused_qk_norm_rope,
    use_fa4_attention,
)
from worker.optimizations.quack_gating import apply_quack_gating, quack_unavailable
from worker.optimizations.quack_gelu import apply_quack_gelu, quack_gelu_unavailable
from worker.optimizations.quack_qk import apply_quack_qk, quack_qk_unavailable
from worker.optimizations.quantize import Fp8Config, apply_fp8, check_fp8_supported
from worker.optimizations.rows import one_pass_rows
from worker.optimizations.settled_devices import settle_devices
from worker.optimizations.symmetric_exchange import set_barrier_timeout
from worker.optimizations.trials import trial_failure
from worker.optimizations.vae import apply_vae_tiling, check_vae_fits, load_vae
from worker.optimizations.vae_attention import apply_gemm_attention
from worker.options import EngineOptions
from worker.parallel import (
    ParallelLayout,
    apply_sequence_parallel,
    attention_backend_for,
    parallel_layout,
    replicated_transformer,
    splits_evenly,
)
from worker.tensor_parallel import apply_text_encoder_tp, apply_transformer_tp, sharded_text_encoder
from worker.types import GenerationOutput, StepCallback

log = logging.getLogger("fluxgate.engine")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # FLUX.1's CLIP and T5


class CacheRunner(Protocol):
    """Per-request cache presets (Cache-DiT): set up before a call, counted after it."""

    def prepare(self, preset: str, num_inference_steps: int, true_cfg: bool = False) -> None: ...

    def cached_steps(self) -> int: ...

    def caching(self) -> bool: ...


CacheFactory = Callable[[Any], CacheRunner]


def internal_params(width: int, height: int, steps: int, cache: str, prompt: str) -> GenerationParams:
    """Parameters of a run the engine makes for itself (warm-up, benchmarks): seed 0, one PNG image."""
    return GenerationParams(
        model="internal",
        prompt=prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=3.5,
        seed=0,
        num_images=1,
        output_format="png",
        output_quality=90,
        cache=cache,
    )


def flux2_reference_tokens(image: Image.Image) -> int:
    """Tokens a reference image adds to FLUX.2's sequence, as ``Flux2Pipeline.__call__`` sizes it
    (diffusers 0.42.1, pipeline_flux2.py:893-901): scaled down to 1024x1024 pixels of area if larger
    (``Flux2ImageProcessor._resize_to_target_area``: ``int`` of each side times the scale), floored to
    multiples of 16, then one token per 16x16 pixels."""
    width, height = image.size
    if width * height > 1024 * 1024:
        scale = math.sqrt(1024 * 1024 / (width * height))
        width, height = int(width * scale), int(height * scale)
    return (width // 16) * (height // 16)


def kontext_reference_tokens(image: Image.Image) -> int:
    """Tokens FLUX.1 Kontext's reference image adds to the sequence, as ``FluxKontextPipeline.__call__``
    sizes it (diffusers 0.42.1, pipeline_flux_kontext.py:936-944, ``_auto_resize``): the preferred
    Kontext resolution nearest its aspect ratio (taken on sides floored to multiples of 16), one token per
    16x16 pixels. -1 for an image too small to have an aspect ratio there."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    width, height = image.width - image.width % 16, image.height - image.height % 16
    if width == 0 or height == 0:
        return -1
    aspect_ratio = width / height
    _, width, height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return (width // 16) * (height // 16)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """The pipeline's images in [0, 1] as PIL images, rounded as diffusers' ``numpy_to_pil`` rounds them
    (``round(x * 255)`` in float32: the same bytes), with the arithmetic on the images' device: one uint8
    copy to the host instead of float32 passes over every pixel in numpy on the host."""
    # contiguous before the copy: PIL copies a strided array pixel by pixel (~8 ms a megapixel on the host)
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if pixels.is_cuda:
        # into page-locked memory torch's host allocator keeps for the next call: the DMA lands there
        # directly, where a pageable copy goes through the driver's staging buffer and faults in fresh
        # pages (part of the 2.9-6.7 ms the GPU idled at the call's end in leases 66-69)
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        pixels = host.copy_(pixels)
    else:
        pixels = pixels.cpu()
    return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels.numpy()]


def resolve_device(option: str) -> torch.device:
    """The device of this process; in a multi-GPU group, the GPU of this rank (set when the group starts)."""
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "cpu"
    if option == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if option == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(option)


def resolve_dtype(option: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (FLUX's native precision); fp32 on CPUs, where bf16 matmuls are slow."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[option]


def load_pipeline(model_path: str, options: EngineOptions, device: torch.device) -> Any:
    """``from_pretrained`` on a hub id or a local directory; the class comes from ``model_index.json``."""
    dtype = resolve_dtype(options.dtype, device)
    vae = load_vae(options.vae_path, dtype, options.vae_trust_remote_code) if options.vae_path else None
    components = {"vae": vae} if vae is not None else {}
    return DiffusionPipeline.from_pretrained(model_path, dtype=dtype, **components)


def prepare_pipeline(pipeline: Any, options: EngineOptions, device: torch.device) -> set[str]:
    """The load-time options, in order: VAE checks, attention backend, placement (offload or resident),
    fp8 quantization.

    Returns the names of the offloaded components.
    """
    if options.vae_path:
        check_vae_fits(pipeline, options.vae_path)
    if options.vae_tiling:
        apply_vae_tiling(pipeline)
    backend = attention_backend_for(parallel_layout(options), options.attention_backend, device)
    if backend:
        apply_attention_backend(pipeline, backend)
    offload = OffloadConfig(
        dit=options.dit_cpu_offload,
        text_encoder=options.text_encoder_cpu_offload,
        vae=options.vae_cpu_offload,
        pin_memory=options.pin_cpu_memory,
        gpu_memory_budget_gb=options.gpu_memory_budget_gb,
        blocks_per_group=options.offload_blocks_per_group,
    )
    # What is sharded over the group is placed shard by shard, later (worker.tensor_parallel).
    sharded = frozenset({sharded_text_encoder(pipeline)}) if options.tp_size > 1 else frozenset()
    sharded |= {"transformer"} if options.dit_tp_size > 1 else set()
    offloaded = apply_offload(pipeline, offload, device, placed_elsewhere=sharded)
    if options.quantize == "fp8":  # after placement (quantizing on the GPU takes seconds), before compile
        apply_fp8(pipeline, Fp8Config(), device)
    pipeline.set_progress_bar_config(disable=True)
    return offloaded


@contextlib.contextmanager
def running_with(pipeline: Any, components: dict[str, Any]) -> Iterator[None]:
    """Run ``pipeline`` with ``components`` (name: stand-in) in place of its own for the duration."""
    own = {name: getattr(pipeline, name) for name in components}
    swapped = {name: part for name, part in components.items() if part is not own[name]}
    for name, part in swapped.items():
        setattr(pipeline, name, part)
    try:
        yield
    finally:
        for name in swapped:
            setattr(pipeline, name, own[name])


def compile_for_speed(
    pipeline: Any, options: EngineOptions, layout: ParallelLayout, offloaded: set[str], device: torch.device
) -> None:
    """``--compile``: the transformer's blocks compiled regionally, with what was measured faster beside
    them (docs/performance.md): the GEMM epilogues on a resident, unsharded transformer, quack's gating and
    GELU epilogues unless turned off, ``--quack-qk`` where asked, and the VAE's decoder compiled when it is
    resident and whole (the fused query/key processor is set earlier: ``set_fused_attention``)."""
    resident = "transformer" not in offloaded and layout.dit_tp == 1
    config = CompileConfig(
        mode=options.compile_mode,
        cache_dir=options.compile_cache_dir,
        fullgraph=layout.compile_fullgraph,
    )
    apply_regional_compile(pipeline, config)
    if options.gemm_epilogues and resident:
        # after the regional compile, which finds the blocks by their class names; the compiled
        # blocks call the new forwards when they are first traced (the warm-up)
        changed = apply_gemm_epilogues(pipeline.transformer)
        log.info("GEMM epilogues: %d MLP modules run their GELU inside the GEMMs", changed)
    if options.fused_qkv and resident and layout.sp == 1:  # before quack's query/key epilogue takes the class
        changed = apply_fused_qkv(pipeline.transformer, FusedQKFluxAttnProcessor)
        log.info("fused q/k/v projections: %d attention modules project each stream with one GEMM", changed)
    if options.quack_gating:
        set_quack_gating(pipeline, resident and layout.sp == 1, device)
    if options.quack_qk:
        set_quack_qk(pipeline, resident and layout.sp == 1, device)
    if options.quack_gelu and not options.gemm_epilogues:
        log.info("quack GELU epilogue: off (it takes the place of the GEMM epilogues' GELU, which are off)")
    elif options.quack_gelu:
        set_quack_gelu(pipeline, resident and layout.sp == 1, device)
    bf16_one_gpu = resident and layout.sp == 1 and options.quantize == "none"
    if options.image_rows_last and bf16_one_gpu and image_rows_last(pipeline.transformer):
        log.info("the last single block computes its image rows only (the model discards its text rows)")
    vae: Any = getattr(pipeline, "vae", None)
    whole = type(vae).__name__ == "AutoencoderKL" and "vae" not in offloaded
    if options.compile_vae and whole and not layout.parallel_vae:  # the split decode patches the decoder
        stats = apply_group_stats(vae.decoder) if options.vae_group_stats else 0
        gemm = apply_gemm_attention(vae.decoder) if options.vae_gemm_attention else 0
        vae.decoder.compile(options=DECODER_COMPILE_OPTIONS)  # not the blocks' compile mode
        log.info(
            "VAE decoder compiled (%d GroupNorms with the pixel statistics kernel, %d attentions as GEMMs)",
            stats,
            gemm,
        )


def set_deferred_gating(
    transformer: Any, options: EngineOptions, layout: ParallelLayout, offloaded: set[str]
) -> bool:
    """``--deferred-gating``: the single blocks' gating in the next block's norm kernel, on one GPU with the
    GEMM epilogues' single blocks (a resident bf16 transformer); returns whether it applies. The engine
    turns it off for calls that Cache-DiT's hooks run (``_prepared_transformer``)."""
    resident = "transformer" not in offloaded and layout.dit_tp == 1
    if not (options.deferred_gating and options.gemm_epilogues and resident and layout.sp == 1):
        return False
    deferring = defer_gating(transformer, True)
    if deferring:
        log.info("deferred gating: %d single blocks gate in the next block's norm kernel", deferring)
    return deferring > 0


# The decoder's reductions (its GroupNorms: 4 channels x 1 M pixels a group at 1024x1024) with launch
# configurations inductor benchmarks at compile: a 1024x1024 decode 33.3 against 37.8 ms on an H100
# (bench.vae_check, lease 108, docs/performance.md); coordinate descent (32.4 ms) took 180 s to compile.
DECODER_COMPILE_OPTIONS = {"max_autotune_pointwise": True}


def set_quack_gating(pipeline: Any, applies: bool, device: torch.device) -> None:
    """``--quack-gating``: the double blocks' feed-forward gated in quack's GEMM epilogue, on one GPU with a
    resident, unsharded transformer where quack runs; the log says where it went, or why not."""
    set_quack_epilogue(
        pipeline,
        applies,
        device,
        quack_unavailable,
        apply_quack_gating,
        ("quack gating", "double blocks gate their feed-forward inside its output GEMM"),
    )


def set_quack_qk(pipeline: Any, applies: bool, device: torch.device) -> None:
    """``--quack-qk``: the fused processors' query and key projected, normed and rotated in quack's GEMM
    epilogue, on one GPU with a resident, unsharded transformer where it builds; the log says where, or why
    not."""
    set_quack_epilogue(
        pipeline,
        applies,
        device,
        quack_qk_unavailable,
        apply_quack_qk,
        ("quack query/key epilogue", "attention modules project, norm and rotate in one GEMM"),
    )


def set_quack_gelu(pipeline: Any, applies: bool, device: torch.device) -> None:
    """``--quack-gelu``: the feed-forwards' GELU in quack's GEMM epilogue (in the GEMM epilogues' place), on
    one GPU with a resident, unsharded transformer where it builds; the log says where, or why not."""
    set_quack_epilogue(
        pipeline,
        applies,
        device,
        quack_gelu_unavailable,
        apply_quack_gelu,
        ("quack GELU epilogue", "feed-forwards project and take their GELU in one quack GEMM"),
    )


def set_quack_epilogue(
    pipeline: Any,
    applies: bool,
    device: torch.device,
    unavailable: Callable[[torch.device], str | None],
    apply: Callable[[Any], int],
    log_words: tuple[str, str],
) -> None:
    """Apply a quack epilogue to the transformer where the layout ``applies`` and quack can run it; the log
    (``log_words``: its name, what the changed modules do) says how many changed, or why none."""
    name, what = log_words
    reason = unavailable(device) if applies else "it runs on one GPU with a resident, unsharded transformer"
    if reason is not None:
        log.info("%s: off (%s)", name, reason)
        return
    log.info("%s: %d %s", name, apply(pipeline.transformer), what)


def fuses_qk(options: EngineOptions, layout: ParallelLayout, offloaded: set[str]) -> bool:
    """``--compile`` runs the fused query/key processor on a resident, unsharded transformer: on one GPU, and
    in a Ulysses group on diffusers' runtime (Ulysses-2 2.302 s an image against 2.341 s: 2xH200, lease 57,
    docs/performance.md), where the processor runs the exchange itself, the query, key and value in one
    all-to-all (2.232 against 2.255 s, lease 68). cache-dit's runtime patches or wraps the processor (async
    Ulysses), and Ring was not measured with it."""
    resident = "transformer" not in offloaded and layout.dit_tp == 1
    if not (options.compile and options.fused_qk_norm_rope and resident):
        return False
    return layout.sp == 1 or (layout.runtime == "diffusers" and layout.ring == 1)


def set_fused_attention(
    pipeline: Any, options: EngineOptions, device: torch.device, layout: ParallelLayout
) -> None:
    """The fused query/key processor (or ``--attention-fp8``'s, one GPU only), set before a sequence layout
    configures the processors and before the compile traces them."""
    apply = apply_fp8_attention if options.attention_fp8 else apply_fused_qk_norm_rope
    changed = apply(pipeline.transformer)
    log.info("fused query/key norm + rotary: %d attention modules", changed)
    set_barrier_timeout(options.group_timeout_s)
    if not options.symmetric_exchange:
        for module in pipeline.transformer.modules():
            if isinstance(getattr(module, "processor", None), FusedQKFluxAttnProcessor):
                module.processor.symmetric_exchange = False
    if options.attention_fp8:
        log.info("fp8 attention (cuDNN): %d attention modules", changed)
    elif options.fa4_attention:
        set_fa4_attention(pipeline, options, device, layout)


def set_fa4_attention(
    pipeline: Any, options: EngineOptions, device: torch.device, layout: ParallelLayout
) -> None:
    """FlashAttention-4 for the fused processors' attention, where it runs and no backend was asked for; the
    log says which kernel attends, and why not FA4."""
    if options.attention_backend is not None:
        log.info("attention: --attention-backend %s (not FlashAttention-4)", options.attention_backend)
        return
    reason = fa4_unavailable(device)
    if reason is not None:
        log.info("attention: SDPA (%s)", reason)
        return
    changed = use_fa4_attention(pipeline.transformer, fa4_wave_sms(options, device, layout))
    log.info("attention: FlashAttention-4 in %d attention modules", changed)


def fa4_wave_sms(options: EngineOptions, device: torch.device, layout: ParallelLayout) -> int:
    """``--fa4-waves``: the SMs FA4's calls are split over (``worker.optimizations.fa4_waves``), 0 where
    they are not split; the log says which, and why not. One GPU only: a sequence-parallel rank's calls
    were not measured split."""
    if not options.fa4_waves:
        return 0
    if layout.sp > 1:
        log.info("attention: FlashAttention-4 unsplit (split calls are measured on one GPU only)")
        return 0
    sms = fa4_waves.sm_count(device)
    reason = "no CUDA device" if sms == 0 else None
    reason = reason or trial_failure("FlashAttention-4's split call", fa4_waves.trial_call, device)
    if reason is not None:
        log.info("attention: FlashAttention-4 unsplit (%s)", reason)
        return 0
    log.info("attention: FlashAttention-4's calls split to fill the last wave of %d SMs", sms)
    return sms


def step_graphs_apply(device: torch.device, layout: ParallelLayout, offloaded: set[str]) -> bool:
    """CUDA graphs hold a resident transformer on CUDA: an offloaded one streams its weights under host
    control. A sequence-parallel group's ranks capture its exchanges too (Ulysses-2 18% and cache-dit's
    Ring-2 ~1.6x faster on two H100s: docs/performance.md); a sharded transformer (``--dit-tp-size``)
    keeps launching its own."""
    return device.type == "cuda" and "transformer" not in offloaded and layout.dit_tp == 1


def encoder_graphs_apply(
    device: torch.device, name: str, encoder: Any, offloaded: set[str], sharded: str | None
) -> bool:
    """FLUX.1's CLIP and T5 calls are CUDA graphs where the encoder is resident on CUDA and whole: at a
    call's start the GPU otherwise waits on their eager launches (`fast`'s 10-100 us gaps fell from 577 to
    214 with them, leases 60-61). FLUX.2's Mistral, called for its hidden states, is not measured so."""
    graphable = type(encoder).__name__ in ("CLIPTextModel", "T5EncoderModel")
    return graphable and device.type == "cuda" and name not in offloaded and name != sharded


def cache_block_graphs_apply(layout: ParallelLayout) -> bool:
    """Where step graphs apply, Cache-DiT's block runs are graphs too (worker.optimizations.cache_graphs),
    on one GPU: a group's cache-dit runtime splits the sequence inside the first block, not measured
    under graphs."""
    return layout.sp == 1


class FluxEngine:
    """A warm FLUX pipeline with its load-time optimisations applied."""

    def __init__(self, pipeline: Any, device: torch.device, cache: CacheRunner | None = None) -> None:
        self.pipeline = pipeline
        self.device = device
        self.cache = cache
        self.offloaded: set[str] = set()
        self.layout = ParallelLayout()
        # A group runs jobs whose sequence does not split evenly on this unsplit transformer (same
        # weights, eager), with its own cache controller.
        self.replica: torch.nn.Module | None = None
        self.replica_cache: CacheRunner | None = None
        # --compile's CUDA graphs of the transformer, for calls without cache hooks
        self.graphs: StepGraphs | None = None
        self.encoder_graphs: dict[str, StepGraphs] = {}  # --compile's, by the pipeline's component name
        # --precompute-modulation's tables, by the transformer module (the pipeline's, the replica) they serve
        self.modulation: dict[int, ModulationTables] = {}
        # --one-pass-rows under --compile: inductor's row limit while a call may compile (0: inductor's own)
        self.row_limit = 0
        # --deferred-gating: the single blocks leave their gating to the next block in calls without
        # Cache-DiT hooks (set per call: the hooks compare gated outputs)
        self.defers_gating = False

    @classmethod
    def load(cls, model_path: str, options: EngineOptions, cache: CacheFactory | None = None) -> FluxEngine:
        """Load the pipeline and apply the load-time options."""
        device = resolve_device(options.device)
        if options.quantize != "none":  # fail before a minutes-long weight load
            check_fp8_supported(device)
        if options.attention_fp8:
            check_fp8_attention_supported(device)
        started = time.perf_counter()
        engine = cls.from_pipeline(load_pipeline(model_path, options, device), options, device, cache)
        log.info(
            "loaded %s from %s on %s in %.1fs (offloaded: %s)",
            engine.pipeline_class,
            model_path,
            device,
            time.perf_counter() - started,
            ", ".join(sorted(engine.offloaded)) or "nothing",
        )
        return engine

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, options: EngineOptions, device: torch.device, cache: CacheFactory | None = None
    ) -> FluxEngine:
        """Apply the load-time options to a built pipeline (the GPU benchmark builds its own)."""
        offloaded = prepare_pipeline(pipeline, options, device)
        layout = parallel_layout(options)
        if fuses_qk(options, layout, offloaded):
            set_fused_attention(pipeline, options, device, layout)
        replica = None
        if layout.sp > 1:  # once per process, with its attention backend, before the cache and compile
            replica = replicated_transformer(pipeline.transformer)
            apply_sequence_parallel(pipeline, layout, options.attention_backend, device)
        if layout.tp > 1:
            apply_text_encoder_tp(pipeline, layout.tp, device)
        if layout.dit_tp > 1:  # before compile; --dit-tp-size excludes sequence parallelism and fp8
            apply_transformer_tp(pipeline, layout.dit_tp, device)
        engine = cls(pipeline, device, cache(pipeline) if cache else None)
        if replica is not None:
            engine.replica = replica
            with running_with(pipeline, {"transformer": replica}):
                engine.replica_cache = cache(pipeline) if cache else None
        engine.offloaded = offloaded
        engine.layout = layout
        if options.precompute_modulation and "transformer" not in offloaded and layout.dit_tp == 1:
            engine.precompute_modulation()  # before compile: the compiled blocks trace the tabled layers
        if options.compile:
            compile_for_speed(pipeline, options, layout, offloaded, device)
            engine.defers_gating = set_deferred_gating(pipeline.transformer, options, layout, offloaded)
            engine.row_limit = options.one_pass_rows
            if options.cuda_graphs and device.type == "cuda":
                engine.apply_graphs(options, offloaded, cache is not None)
        # placed, hooked and wrapped for good: diffusers' device lookups answered from here on
        stand_ins = [engine.graphs, engine.replica, *engine.encoder_graphs.values()]
        settle_devices(pipeline, [part for part in stand_ins if part is not None])
        return engine

    def apply_graphs(self, options: EngineOptions, offloaded: set[str], caching: bool) -> None:
        """``--compile``'s CUDA graphs where they apply, all in one memory pool (their outputs are copies):
        the transformer's steps, Cache-DiT's block runs, the modulation projection, the text encoders."""
        recorder, config = CudaRecorder(self.device), GraphConfig()
        transformer = self.pipeline.transformer
        if step_graphs_apply(self.device, self.layout, offloaded):
            self.graphs = apply_step_graphs(transformer, self.device, config, recorder)
            if caching and cache_block_graphs_apply(self.layout):
                from worker.optimizations.cache_graphs import apply_cache_block_graphs

                apply_cache_block_graphs(transformer, recorder, self.device, config)
            for tables in self.modulation.values():  # each job's modulation projection
                tables.graphs = GraphedCalls(tables.project_eagerly, recorder, self.device, config)
        sharded = sharded_text_encoder(self.pipeline) if options.tp_size > 1 else None
        for name in TEXT_ENCODERS:
            encoder: Any = getattr(self.pipeline, name, None)
            if encoder_graphs_apply(self.device, name, encoder, offloaded, sharded):
                self.encoder_graphs[name] = apply_step_graphs(encoder, self.device, config, recorder)
        log.info("text encoders replayed as CUDA graphs: %s", ", ".join(self.encoder_graphs) or "none")

    def precompute_modulation(self) -> None:
        """Each job's adaLN modulation projected for all its steps at once (worker.optimizations.modulation),
        on the pipeline's resident transformer and the group's replica."""
        for transformer in (self.pipeline.transformer, self.replica):
            tables = apply_modulation_tables(transformer) if transformer is not None else None
            if tables is not None:
                self.modulation[id(transformer)] = tables
        log.info("modulation precomputed per job: %d transformer(s)", len(self.modulation))

    @property
    def pipeline_class(self) -> str:
        return type(self.pipeline).__name__

    def warmup(self, resolutions: list[tuple[int, int]], presets: list[str], steps: int = 2) -> float:
        """Run every (resolution, cache preset) once at start, so compilation never lands on a user."""
        started = time.perf_counter()
        for width, height in resolutions or [(256, 256)]:
            for preset in presets or ["off"]:
                params = internal_params(width, height, steps, preset, prompt="warm-up")
                self.generate(params, lambda step, total: None)
        return time.perf_counter() - started

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput:
        """Run one job. Image ``i`` uses its own CPU generator seeded ``seed + i`` (device-independent).

        ``references`` are the job's reference images (editing), decoded from storage by the runner.
        """
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        transformer, cache = self._prepared_transformer(params, references)
        return self._run(transformer, cache, self._call_arguments(params, on_step, references))

    def generate_batch(self, batch: Sequence[GenerationParams], on_step: StepCallback) -> GenerationOutput:
        """Run jobs that differ only in prompt and seed (``GenerationParams.batch_key``) in one pipeline call.

        Image ``i`` is job ``i``'s, from its own CPU generator seeded ``image_seed(0)`` as when it runs
        alone, so it is the same image up to the batched kernels' rounding (docs/design.md, "Batching").
        ``on_step`` hears each step once, for the whole batch.
        """
        first = batch[0]
        if len({params.batch_key() for params in batch}) != 1 or first.batch_key() is None:
            raise ValueError("a batch takes one-image jobs that differ only in prompt and seed")
        if self.layout.sp > 1:
            raise ValueError("a sequence-parallel group runs one job at a time")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        transformer, cache = self._prepared_transformer(first)
        kwargs = self._call_arguments(first, on_step)
        kwargs["prompt"] = [params.prompt for params in batch]
        kwargs["generator"] = [torch.Generator(device="cpu").manual_seed(p.image_seed(0)) for p in batch]
        if first.negative_prompt is not None:  # one per prompt: a lone string is encoded as a batch of one
            kwargs["negative_prompt"] = [first.negative_prompt] * len(batch)
        return self._run(transformer, cache, kwargs)

    def _run(self, transformer: Any, cache: CacheRunner | None, kwargs: dict[str, Any]) -> GenerationOutput:
        """One pipeline call with ``transformer`` in place; its modulation rows checked after it."""
        with (
            torch.inference_mode(),
            running_with(self.pipeline, {"transformer": transformer, **self.encoder_graphs}),
            one_pass_rows(self.row_limit),
            noise_drawn_ahead(self.pipeline, kwargs),
        ):
            images = to_pil(self.pipeline(**kwargs).images)
        if isinstance(transformer, Schedule):
            transformer.verify()
        cached = cache.cached_steps() if cache is not None else 0
        return GenerationOutput(images=images, peak_memory_mb=self._peak_memory_mb(), cached_steps=cached)

    def warmup_batches(
        self, resolutions: list[tuple[int, int]], presets: list[str], max_batch_size: int, steps: int = 2
    ) -> float:
        """Run every batch size from 2 to ``max_batch_size`` once per (resolution, preset) at start: a new
        batch size retraces the compiled blocks, which must not land on a user."""
        started = time.perf_counter()
        for width, height in resolutions or [(256, 256)]:
            for preset in presets or ["off"]:
                params = internal_params(width, height, steps, preset, prompt="warm-up")
                for size in range(2, max_batch_size + 1):
                    self.generate_batch([params] * size, lambda step, total: None)
        return time.perf_counter() - started

    def _prepared_transformer(
        self, params: GenerationParams, references: Sequence[Image.Image] = ()
    ) -> tuple[Any, CacheRunner | None]:
        """What runs this job's steps, its cache controller prepared for the call: a group's unsplit replica
        where the sequence does not split evenly, the CUDA graphs where no cache hook runs, else the
        pipeline's own transformer; behind the job's modulation schedule where it has tables."""
        transformer, cache = self.pipeline.transformer, self.cache
        if self.layout.sp > 1 and not splits_evenly(self._image_tokens(params, references), self.layout):
            assert self.replica is not None, "a sequence-parallel engine keeps a replica"
            transformer, cache = self.replica, self.replica_cache
        if cache is not None:
            # True CFG runs the transformer twice per step; the cache must count both passes.
            true_cfg = params.negative_prompt is not None and (params.true_cfg_scale or 1.0) > 1.0
            cache.prepare(params.cache, params.num_inference_steps, true_cfg=true_cfg)
        caching = bool(cache and cache.caching())
        if self.defers_gating:
            defer_gating(transformer, not caching)
        tables = self.modulation.get(id(transformer))
        if self.graphs is not None and transformer is self.graphs.module and not caching:
            transformer = self.graphs
        if tables is not None:
            transformer = tables.schedule(transformer, self.pipeline.scheduler)
        return transformer, cache

    def _call_arguments(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> dict[str, Any]:
        total = params.num_inference_steps

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, total)
            return tensors

        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": total,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.num_images,
            "generator": [
                torch.Generator(device="cpu").manual_seed(params.image_seed(i))
                for i in range(params.num_images)
            ],
            "output_type": "pt",  # to_pil converts on the GPU
            "callback_on_step_end": step_end,
        }
        if self.pipeline_class == "FluxKontextPipeline":
            # Kontext rescales the output to max_area (default 1 MP) keeping the aspect ratio; the
            # requested size is the contract, so the area is exactly width x height.
            kwargs["max_area"] = params.width * params.height
        if params.negative_prompt is not None:
            kwargs["negative_prompt"] = params.negative_prompt
        if params.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = params.true_cfg_scale
        if references:
            kwargs["image"] = self._image_argument(references)
        return kwargs

    def _image_argument(self, references: Sequence[Image.Image]) -> Any:
        """Kontext takes one PIL image (``image=``); FLUX.2 a list of them (multi-reference editing)."""
        if self.pipeline_class == "FluxKontextPipeline":
            if len(references) != 1:
                raise ValueError(f"FLUX.1 Kontext takes one reference image, got {len(references)}")
            return references[0]
        if self.pipeline_class == "Flux2Pipeline":
            return list(references)
        raise ValueError(f"{self.pipeline_class} does not take reference images")

    def _image_tokens(self, params: GenerationParams, references: Sequence[Image.Image]) -> int:
        """Image tokens of the transformer's sequence: 2x2 latent patches of the 8x VAE, so (W/16)(H/16).

        Each reference image's tokens are appended, sized as its pipeline sizes them
        (``flux2_reference_tokens``, ``kontext_reference_tokens``), so the count is exact and an even
        split stays compilable; -1 where it is not known (the job then runs on the unsplit replica).
        """
        tokens = (params.width // 16) * (params.height // 16)
        if not references:
            return tokens
        if self.pipeline_class == "Flux2Pipeline":
            return tokens + sum(flux2_reference_tokens(image) for image in references)
        if self.pipeline_class != "FluxKontextPipeline":
            return -1
        reference = kontext_reference_tokens(references[0])
        return tokens + reference if reference >= 0 else -1

    def _peak_memory_mb(self) -> float:
        """Peak GPU memory of this job on CUDA; on a CPU, the process's peak resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
