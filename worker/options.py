"""The worker's runtime options: ``fluxgate worker`` flags, each also a ``FLUXGATE_`` setting.

They mirror ``sglang serve``'s FLUX options and are applied once, when the pipeline is loaded;
per-request choices (the cache preset) travel with each job.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The text sequence of every FLUX pipeline the engine calls (their max_sequence_length default, which the
# engine keeps): a sequence-parallel group splits it, as the image tokens, into equal shards.
TEXT_TOKENS = 512

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
RESOLUTION = re.compile(r"^(\d+)x(\d+)$")
# Every batch size up to the maximum is warmed up at start (compiled graphs), so the bound keeps start-up
# short; 16 FLUX images of 1024x1024 at once are already past what one 80 GB card holds with the model.
MAX_BATCH_SIZE = 16


class EngineOptions(BaseSettings):
    """Load-time options of the FLUX engine. Environment: ``FLUXGATE_<NAME>``; flags override."""

    model_config = SettingsConfigDict(env_prefix="FLUXGATE_", extra="ignore")

    model_path: str | None = None
    model_name: str | None = None
    device: Device = "auto"
    dtype: DType = "auto"
    warmup: bool = True
    vae_path: str | None = None
    vae_tiling: bool = False
    vae_trust_remote_code: bool = False
    dit_cpu_offload: bool = False
    text_encoder_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    pin_cpu_memory: bool = False
    gpu_memory_budget_gb: float | None = Field(default=None, gt=0)
    # Two blocks per copy: 1.10x the host link's bound on an H100, against 1.17-1.26x with one and 1.14x
    # with four (docs/performance.md, "Offload: blocks per copy group").
    offload_blocks_per_group: int = Field(default=2, ge=1)
    attention_backend: str | None = None
    compile: bool = False
    compile_mode: str | None = None
    # With --compile, FLUX.1's MLP GELUs run in their GEMMs' epilogues (worker.optimizations.epilogues):
    # 2.2% off an image on an H100 at the same PSNR against eager (docs/performance.md, lease 22).
    gemm_epilogues: bool = True
    # With --compile on one GPU, FLUX.1's query/key RMSNorms and rotary embedding run as one Triton kernel
    # (worker.optimizations.qk_norm_rope), and the VAE's decoder is compiled too (docs/performance.md,
    # lease 25).
    fused_qk_norm_rope: bool = True
    compile_vae: bool = True
    # With --compile's fused query/key processor on a Hopper GPU where flash-attn-4 is installed, the
    # attention runs FlashAttention-4's kernel, not SDPA's cuDNN one (worker.optimizations.fa4_attention):
    # 6% less attention time at FLUX.1's shapes, 1.6% off a lossless image on an H100 (leases 84-85).
    fa4_attention: bool = True
    # ...each call split where its tiles leave the last wave partly idle (worker.optimizations.fa4_waves):
    # FLUX.1's 864 tiles on an H100's 132 SMs take 7 waves unsplit, ~6.7 split.
    fa4_waves: bool = True
    # With --compile's fused query/key processor on one GPU, each stream's query, key and value projections
    # run as one GEMM over one buffer of their weights, which the layers keep as views (no memory added), and
    # the double blocks' joint value is a view, not a copy (worker.optimizations.fused_qkv).
    fused_qkv: bool = True
    # With --compile on one Hopper GPU where quack is installed, the double blocks' feed-forward gating runs
    # in the output GEMM's epilogue (worker.optimizations.quack_gating). With --quack-gelu (both the
    # defaults) the lossless image is 1.9% faster on an H100, every run of one faster than every run
    # without (lease 115, docs/performance.md).
    quack_gating: bool = True
    # With --compile on one Hopper GPU where quack is installed, the query and key projections norm and rotate
    # in their GEMM's epilogue (worker.optimizations.quack_qk): opt-in, 0.4 ms off a step (lease 103), within
    # the noise.
    quack_qk: bool = False
    # With --compile's GEMM epilogues on one Hopper GPU where quack is installed, the feed-forwards' input
    # projections of image rows take their tanh GELU in quack's GEMM epilogue
    # (worker.optimizations.quack_gelu; its GEMMs 3-5% under cuBLAS's GELU epilogue, lease 114).
    quack_gelu: bool = True
    # With --compile's GEMM epilogues and fused query/key processor on one GPU (bf16 weights), the last
    # single block attends, projects and gates its image rows only: the model discards its text rows
    # (worker.optimizations.epilogues.image_rows_last).
    image_rows_last: bool = True
    # With --compile's GEMM epilogues on one GPU, each single block but the last leaves its gating
    # (``residual + gate * proj_out(...)``) to the next block's norm kernel, in calls without Cache-DiT
    # hooks: one pass over the rows fewer a block (worker.optimizations.epilogues.defer_gating).
    deferred_gating: bool = True
    # With --compile's compiled VAE decoder, its GroupNorms take their statistics from a kernel that reads
    # whole channels-last pixels (worker.optimizations.group_stats); inductor's reduction reads one channel
    # of a pixel per load.
    vae_group_stats: bool = True
    # With --compile's compiled VAE decoder, its mid-block attention (one head of width 512, which no flash
    # kernel takes) runs as two cuBLAS GEMMs around a softmax (worker.optimizations.vae_attention).
    vae_gemm_attention: bool = True
    # With --compile, a resident transformer replays each step as a CUDA graph where no Cache-DiT preset
    # runs (worker.optimizations.cuda_graphs): fp8 steps and groups' steps are bound by the host's launches.
    cuda_graphs: bool = True
    # A resident FLUX.1 transformer's adaLN modulation projected once per job for all steps
    # (worker.optimizations.modulation): 6.5 GB of weight reads a step fewer.
    precompute_modulation: bool = True
    # With --compile, inductor reduces rows of up to this many elements in one pass from registers
    # (worker.optimizations.rows): FLUX.1's 3,072-wide LayerNorms; 0 keeps inductor's 1,024.
    one_pass_rows: int = Field(default=4096, ge=0, le=65536)
    compile_cache_dir: str | None = None
    quantize: Literal["none", "fp8"] = "none"
    # FLUX.1's attention in fp8 through cuDNN (worker.optimizations.fp8_attention): lossy, so opt-in;
    # needs --compile's fused query/key kernel on one Hopper-or-newer GPU (docs/performance.md).
    attention_fp8: bool = False
    warmup_resolutions: str = ""
    num_gpus: int = Field(default=1, ge=1)
    sp_degree: int | None = Field(default=None, ge=1)
    ulysses_degree: int | None = Field(default=None, ge=1)
    ring_degree: int | None = Field(default=None, ge=1)
    tp_size: int = Field(default=1, ge=1)
    dit_tp_size: int = Field(default=1, ge=1)
    group_timeout_s: float = Field(default=300.0, gt=0)
    # A group's sequence parallelism (docs/design.md, "Multi-GPU worker groups"): cache-dit's runtime or
    # diffusers'; "auto" takes diffusers' unless a cache-dit feature is asked for (``resolved_sp_runtime``).
    # Async Ulysses, the decode split and Cache-DiT presets in groups are cache-dit's.
    sp_runtime: Literal["auto", "cache-dit", "diffusers"] = "auto"
    ulysses_async: bool = False
    parallel_vae: bool = False
    # Ulysses' exchanges on diffusers' runtime through symmetric memory, copied by the copy engines
    # (worker.optimizations.symmetric_exchange): 5% off a Ulysses-2 image on 2xH200. Off: NCCL's all-to-all,
    # for hosts whose containers cannot map a peer's memory (the first warm-up exchange fails there).
    symmetric_exchange: bool = True
    # Jobs run together in one pipeline call when compatible (docs/design.md, "Batching"); 1 = off.
    max_batch_size: int = Field(default=1, ge=1, le=MAX_BATCH_SIZE)

    @field_validator("model_path", "vae_path", "attention_backend", "compile_cache_dir")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("warmup_resolutions")
    @classmethod
    def _resolutions(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            match = RESOLUTION.match(item)
            if (
                not match
                or int(match[1]) % 16
                or int(match[2]) % 16
                or not int(match[1])
                or not int(match[2])
            ):
                raise ValueError(f"{item!r} is not WIDTHxHEIGHT with both multiples of 16 (e.g. 1024x1024)")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> EngineOptions:
        if self.gpu_memory_budget_gb is not None and (self.dit_cpu_offload or self.text_encoder_cpu_offload):
            raise ValueError(
                "--gpu-memory-budget-gb chooses what to offload itself; drop --dit-cpu-offload and "
                "--text-encoder-cpu-offload, or drop the budget"
            )
        if self.pin_cpu_memory and not self.any_offload:
            raise ValueError("--pin-cpu-memory only applies with an offload option or --gpu-memory-budget-gb")
        if self.quantize != "none":
            self._check_quantize()
        if self.attention_fp8:
            self._check_attention_fp8()
        self._check_parallel_layout()
        return self

    def _check_parallel_layout(self) -> None:
        """Degrees as ``sglang serve`` takes them: ulysses x ring = sp = num_gpus; tp divides num_gpus."""
        ulysses, ring = self.ulysses_degree or 1, self.ring_degree or 1
        given = self.ulysses_degree or self.ring_degree
        if self.sp_degree is not None and given and ulysses * ring != self.sp_degree:
            raise ValueError(
                f"--sp-degree {self.sp_degree} must equal --ulysses-degree x --ring-degree "
                f"({ulysses} x {ring})"
            )
        sp = self.layout[0] * self.layout[1]
        if self.dit_tp_size > 1:
            self._check_transformer_tp(sp)
            return
        if sp > self.num_gpus:
            raise ValueError(f"the sequence-parallel degree {sp} exceeds --num-gpus {self.num_gpus}")
        if sp != self.num_gpus:
            raise ValueError(
                f"--num-gpus {self.num_gpus} with a sequence-parallel degree of {sp}: every GPU of a "
                "group runs one shard of the same image, so ulysses x ring must equal --num-gpus "
                "(for more images at once, run one worker per GPU)"
            )
        if TEXT_TOKENS % sp:
            raise ValueError(
                f"a sequence-parallel degree of {sp} does not divide the {TEXT_TOKENS} text tokens every "
                "prompt is encoded to, which each rank takes an equal share of: use 2, 4 or 8 GPUs"
            )
        if self.num_gpus % self.tp_size:
            raise ValueError(f"--tp-size {self.tp_size} must divide --num-gpus {self.num_gpus}")
        if self.num_gpus > 1 and self.max_batch_size > 1:
            raise ValueError(
                f"--max-batch-size {self.max_batch_size} is for one-GPU workers: a multi-GPU group "
                "(--num-gpus > 1) runs one job at a time"
            )
        if self.num_gpus > 1 and self.any_offload:
            raise ValueError(
                "offloading is for one GPU; a multi-GPU group (--num-gpus > 1) keeps weights resident"
            )
        self._check_group_features()

    def _check_transformer_tp(self, sp: int) -> None:
        """``--dit-tp-size`` shards the transformer over the whole group, without sequence parallelism."""
        tp = self.dit_tp_size
        if tp != self.num_gpus or sp != 1:
            raise ValueError(
                f"--dit-tp-size {tp} shards the transformer over the whole group: it must equal --num-gpus "
                f"({self.num_gpus}), without --ulysses-degree, --ring-degree or --sp-degree"
            )
        if self.num_gpus % self.tp_size:
            raise ValueError(f"--tp-size {self.tp_size} must divide --num-gpus {self.num_gpus}")
        for flag, on in (
            ("--quantize fp8", self.quantize != "none"),
            ("--max-batch-size", self.max_batch_size > 1),
            ("an offload option", self.any_offload),
            ("--ulysses-async", self.ulysses_async),
            ("--parallel-vae", self.parallel_vae),
        ):
            if on:
                raise ValueError(f"--dit-tp-size {tp} does not combine with {flag}")

    def _check_group_features(self) -> None:
        """Async Ulysses and the decode split are cache-dit's, and need a group (and Ulysses) to act on."""
        ulysses, ring = self.layout
        if self.ulysses_async and ulysses == 1:
            raise ValueError("--ulysses-async overlaps Ulysses' all-to-all: it needs --ulysses-degree > 1")
        if self.ulysses_async and ring > 1:
            raise ValueError(
                "--ulysses-async is for Ulysses alone: cache-dit's async path skips the Ring exchange, so "
                "drop it or --ring-degree"
            )
        if self.parallel_vae and self.num_gpus == 1:
            raise ValueError("--parallel-vae splits the decode over a group's GPUs: it needs --num-gpus > 1")
        for flag, on in (("--ulysses-async", self.ulysses_async), ("--parallel-vae", self.parallel_vae)):
            if on and self.sp_runtime == "diffusers":
                raise ValueError(f"{flag} is cache-dit's: it needs --sp-runtime cache-dit (or auto)")

    def resolved_sp_runtime(self, cache_presets: bool = False) -> Literal["cache-dit", "diffusers"]:
        """The runtime a group runs: the one asked for, or for "auto" diffusers', except where a layout
        needs one of cache-dit's features (Cache-DiT presets, async Ulysses, the decode split). diffusers'
        compiles the whole block (cache-dit's Ring breaks the graph at its K/V rotation) and, with the
        steps' CUDA graphs, ran Ulysses-2 at 2.49 s and Ring-2 at 2.51 s where cache-dit's async
        Ulysses-2 with the decode split ran 2.57 s, on one 2xH100 (docs/performance.md, lease 39)."""
        if self.sp_runtime != "auto":
            return self.sp_runtime
        cache_dit_only = cache_presets or self.ulysses_async or self.parallel_vae
        return "cache-dit" if cache_dit_only else "diffusers"

    def _check_quantize(self) -> None:
        """fp8 quantizes bf16 weights of a resident transformer (streamed fp8 weights are not verified)."""
        if self.dtype in ("float16", "float32"):
            raise ValueError(f"--quantize {self.quantize} needs bfloat16 weights: --dtype bfloat16 or auto")
        if self.dit_cpu_offload or self.gpu_memory_budget_gb is not None:
            raise ValueError(
                f"--quantize {self.quantize} keeps the transformer resident: drop --dit-cpu-offload and "
                "--gpu-memory-budget-gb (--text-encoder-cpu-offload and --vae-cpu-offload are fine)"
            )

    def _check_attention_fp8(self) -> None:
        """fp8 attention runs in the fused query/key processor of a compiled, resident, one-GPU engine."""
        needs = [
            ("--compile", self.compile),
            ("the fused query/key kernel (drop --no-fused-qk-norm-rope)", self.fused_qk_norm_rope),
            ("bfloat16 weights (--dtype bfloat16 or auto)", self.dtype in ("auto", "bfloat16")),
            ("one GPU (--num-gpus 1)", self.num_gpus == 1),
            (
                "a resident transformer (drop --dit-cpu-offload, --gpu-memory-budget-gb)",
                not self.dit_cpu_offload and self.gpu_memory_budget_gb is None,
            ),
        ]
        missing = [what for what, met in needs if not met]
        if missing:
            raise ValueError(f"--attention-fp8 needs {', '.join(missing)}")

    @property
    def any_offload(self) -> bool:
        return (
            self.dit_cpu_offload
            or self.text_encoder_cpu_offload
            or self.vae_cpu_offload
            or self.gpu_memory_budget_gb is not None
        )

    @property
    def layout(self) -> tuple[int, int]:
        """(ulysses, ring) degrees; ``--sp-degree`` or ``--num-gpus`` alone means Ulysses over all of them."""
        if self.ulysses_degree or self.ring_degree:
            return self.ulysses_degree or 1, self.ring_degree or 1
        return self.sp_degree or self.num_gpus // self.dit_tp_size, 1

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The warm-up resolutions as (width, height) pairs."""
        pairs = []
        for item in filter(None, (part.strip() for part in self.warmup_resolutions.split(","))):
            width, height = item.split("x")
            pairs.append((int(width), int(height)))
        return pairs
