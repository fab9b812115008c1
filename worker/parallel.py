"""Sequence parallelism of the transformer (Ulysses, Ring) in a worker group, applied once per process.

Every rank of a worker group holds the whole pipeline; sequence parallelism splits the transformer's
sequence (text and image tokens) across the ranks, and attention exchanges heads (Ulysses, an
all-to-all) or key/value blocks (Ring) so that each rank computes exact attention over the whole
sequence. Text encoders and (unless ``--parallel-vae``) the VAE run replicated: every rank gets the same
latents from the same seed, and rank 0's image is the result.

Two runtimes, one per process and never both (../shared/reference/libraries.md):

* ``cache-dit`` (default): cache-dit's own ``ParallelismConfig`` runtime (``cache_dit/distributed``). Its
  hooks compose with Cache-DiT's cached steps (docs/design.md, "Cache-DiT under sequence parallelism"),
  and it offers async Ulysses (the all-to-all overlapped with the QKV projections) and a decode split
  over the ranks.
* ``diffusers``: diffusers' ``ContextParallelConfig``, the runtime groups started with; kept to compare
  against and for Ring, which it compiles as one graph. It runs no Cache-DiT presets.

Jobs whose sequence does not split evenly run on an unsplit replica of the transformer on every rank
(``splits_evenly``, ``replicated_transformer``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.options import EngineOptions

log = logging.getLogger("fluxgate.parallel")

RUNTIMES = ("cache-dit", "diffusers")

# diffusers 0.42.1 backends registered with supports_context_parallel=True (models/attention_dispatch.py).
CONTEXT_PARALLEL_BACKENDS = frozenset(
    {
        "flash",
        "flash_hub",
        "flash_varlen_hub",
        "_flash_3_hub",
        "_flash_3_varlen_hub",
        "native",
        "_native_cudnn",
        "_native_flash",
        "_native_npu",
        "sage",
        "sage_hub",
    }
)
# Ring attention merges partial results with their log-sum-exp; these backends return it.
RING_BACKENDS = frozenset(
    {"flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub"}
)
RING_DEFAULT_BACKEND = "_native_cudnn"

# cache-dit 1.5.3 backends registered with supports_context_parallel=True (cache_dit/attention/backends/),
# leaving out its NPU and sm_89/sm_120-only (ffpa) kernels. cache-dit names them itself: diffusers'
# "_native_cudnn" is its "_sdpa_cudnn".
CACHE_DIT_BACKENDS = frozenset(
    {"native", "_sdpa_cudnn", "flash", "_flash_3", "flash_varlen", "sage", "sage3"}
)
# Those whose forward op returns the log-sum-exp Ring needs ("native" through torch's flash SDPA kernel,
# which has no CPU implementation; "_sdpa_cudnn", "flash_varlen" and "sage3" raise on return_lse).
CACHE_DIT_RING_BACKENDS = frozenset({"native", "flash", "_flash_3", "sage"})
CACHE_DIT_NAME_OF = {"_native_cudnn": "_sdpa_cudnn"}
# The package each cache-dit kernel imports (cache_dit/attention/backends/): checked at start.
CACHE_DIT_PACKAGES = {
    "flash": "flash_attn",
    "flash_varlen": "flash_attn",
    "_flash_3": "flash_attn_interface",
    "sage": "sageattention",
    "sage3": "sageattn3",
}


class ParallelError(ValueError):
    """The group's degrees do not fit this model or backend; the message names the flag to change."""


@dataclass(frozen=True)
class ParallelLayout:
    """How a worker group splits the work: sequence-parallel degrees and runtime, text-encoder tensor
    parallel, and the optional async Ulysses and decode split."""

    ulysses: int = 1
    ring: int = 1
    tp: int = 1
    dit_tp: int = 1
    runtime: str = "cache-dit"
    ulysses_async: bool = False
    parallel_vae: bool = False

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def compile_fullgraph(self) -> bool:
        """Whether each block compiles as one graph. cache-dit's Ring rotates K/V with
        ``dist.batch_isend_irecv``, which dynamo cannot trace (measured: the warm-up fails on 4xH200), so
        its Ring layouts compile with a graph break around the exchange; every other layout is one graph."""
        return not (self.ring > 1 and self.runtime == "cache-dit")

    @property
    def describe(self) -> str:
        extras = [f"dit_tp={self.dit_tp}"] if self.dit_tp > 1 else []
        extras += [f"runtime={self.runtime}"] if self.sp > 1 else []  # no sequence split: no runtime
        extras += [name for name in ("ulysses_async", "parallel_vae") if getattr(self, name)]
        return ",".join([f"ulysses={self.ulysses},ring={self.ring},tp={self.tp}", *extras])


def parallel_layout(options: EngineOptions) -> ParallelLayout:
    """The layout the worker options ask for (validated by ``EngineOptions``)."""
    ulysses, ring = options.layout
    return ParallelLayout(
        ulysses=ulysses,
        ring=ring,
        tp=options.tp_size,
        dit_tp=options.dit_tp_size,
        runtime=options.resolved_sp_runtime(),
        ulysses_async=options.ulysses_async,
        parallel_vae=options.parallel_vae,
    )


def attention_backend_for(layout: ParallelLayout, chosen: str | None, device: torch.device) -> str | None:
    """The backend set through diffusers while the pipeline is prepared: the chosen one on one GPU.

    A group's backend belongs to its parallelism and is set with it (``group_attention_backend``).
    """
    return chosen if layout.sp == 1 else None


def group_attention_backend(layout: ParallelLayout, chosen: str | None, device: torch.device) -> str | None:
    """The backend a group runs on (``None``: the runtime's default, SDPA), checked against its runtime."""
    if layout.runtime == "diffusers":
        return _diffusers_backend(layout, chosen, device)
    return _cache_dit_backend(layout, chosen, device)


def _diffusers_backend(layout: ParallelLayout, chosen: str | None, device: torch.device) -> str | None:
    if chosen is not None and chosen.lower() not in CONTEXT_PARALLEL_BACKENDS:
        names = ", ".join(sorted(CONTEXT_PARALLEL_BACKENDS))
        raise ParallelError(
            f"--attention-backend {chosen!r} does not support sequence parallelism; choose one of: {names}"
        )
    if layout.ring == 1:
        return chosen
    if chosen is None:
        if device.type != "cuda":
            raise ParallelError("--ring-degree > 1 needs a CUDA attention kernel that returns log-sum-exp")
        return RING_DEFAULT_BACKEND
    if chosen.lower() not in RING_BACKENDS:
        names = ", ".join(sorted(RING_BACKENDS))
        raise ParallelError(
            f"--ring-degree > 1 needs an attention backend returning log-sum-exp: one of {names}"
        )
    return chosen


def _cache_dit_backend(layout: ParallelLayout, chosen: str | None, device: torch.device) -> str | None:
    name = chosen.lower() if chosen is not None else None
    if name is not None and name not in CACHE_DIT_BACKENDS:
        hint = f" (cache-dit's name for it: {CACHE_DIT_NAME_OF[name]!r})" if name in CACHE_DIT_NAME_OF else ""
        raise ParallelError(
            f"--attention-backend {chosen!r} is not one of cache-dit's sequence-parallel backends{hint}; "
            f"choose one of: {', '.join(sorted(CACHE_DIT_BACKENDS))} (or --sp-runtime diffusers)"
        )
    if device.type != "cuda" and name not in (None, "native"):
        raise ParallelError(f"--attention-backend {chosen!r} needs CUDA; a CPU group runs 'native'")
    package = CACHE_DIT_PACKAGES.get(name or "")
    if package is not None and importlib.util.find_spec(package) is None:
        raise ParallelError(
            f"--attention-backend {chosen!r} needs the {package!r} package, not installed here"
        )
    if layout.ring > 1:
        if device.type != "cuda":
            raise ParallelError(
                "--ring-degree > 1 needs a CUDA attention kernel that returns log-sum-exp "
                "(torch's flash SDPA kernel has no CPU implementation)"
            )
        if name is not None and name not in CACHE_DIT_RING_BACKENDS:
            names = ", ".join(sorted(CACHE_DIT_RING_BACKENDS))
            raise ParallelError(
                f"--ring-degree > 1 needs an attention backend returning log-sum-exp: one of {names}"
            )
    return name


def check_heads(pipe: Any, layout: ParallelLayout) -> None:
    """Ulysses gives each rank whole attention heads, so the degree must divide the head count."""
    heads = int(pipe.transformer.config.num_attention_heads)
    if heads % layout.ulysses:
        raise ParallelError(
            f"--ulysses-degree {layout.ulysses} must divide the transformer's {heads} attention heads"
        )


def apply_sequence_parallel(
    pipe: Any, layout: ParallelLayout, attention_backend: str | None, device: torch.device
) -> None:
    """Split the transformer's sequence over the group: once per process, after placement and before
    Cache-DiT and compile wrap the blocks (either runtime refuses a second call)."""
    check_heads(pipe, layout)
    backend = group_attention_backend(layout, attention_backend, device)
    if layout.runtime == "diffusers":
        _apply_diffusers(pipe, layout, backend, device)
    else:
        _apply_cache_dit(pipe, layout, backend, device)
    log.info("sequence parallel over %d ranks (%s, attention %s)", layout.sp, layout.describe, backend)


def _apply_diffusers(pipe: Any, layout: ParallelLayout, backend: str | None, device: torch.device) -> None:
    from diffusers import ContextParallelConfig

    from worker.optimizations.attention import apply_attention_backend

    if backend:  # diffusers checks the backend's context-parallel support when parallelism is enabled
        apply_attention_backend(pipe, backend)
    config = ContextParallelConfig(ulysses_degree=layout.ulysses, ring_degree=layout.ring)
    with _cpu_as_one_device(device):
        pipe.transformer.enable_parallelism(config=config)


def _apply_cache_dit(pipe: Any, layout: ParallelLayout, backend: str | None, device: torch.device) -> None:
    """cache-dit's planner for the transformer class (FluxTransformer2DModel, Flux2Transformer2DModel:
    ``cache_dit/distributed/transformers/flux.py``, ``flux2.py``); with ``ulysses_async`` it also patches the
    attention processors to overlap each all-to-all with the next projection
    (``distributed/async_ulysses/flux.py``, ``flux2.py``). The VAE's decode split is tiles handed out
    round-robin (``distributed/autoencoders``), sized per call by ``worker.parallel_vae``."""
    from cache_dit import ParallelismConfig
    from cache_dit.distributed import enable_parallelism

    from worker.parallel_vae import check_parallel_vae, split_decode_tiles

    encode_tiling = bool(getattr(pipe.vae, "use_tiling", False))
    if layout.parallel_vae:
        check_parallel_vae(pipe.vae)
    config = ParallelismConfig(
        ulysses_size=layout.ulysses if layout.ulysses > 1 else None,
        ring_size=layout.ring if layout.ring > 1 else None,
        attention_backend=backend,
        ulysses_async=layout.ulysses_async,
        extra_parallel_modules=[pipe.vae] if layout.parallel_vae else [],
    )
    with _cpu_as_one_device(device):
        enable_parallelism(pipe.transformer, config)
    if layout.parallel_vae:
        split_decode_tiles(pipe.vae, encode_tiling)


def splits_evenly(tokens: int, layout: ParallelLayout) -> bool:
    """Whether a job's sequence splits into equal shards over the group; a job whose sequence does not
    runs on the unsplit replica (``replicated_transformer``) on every rank.

    FLUX's 512 text tokens divide (``EngineOptions`` checks the degree at start); image tokens
    ((width/16) x (height/16), plus reference-image tokens; -1 when not known ahead) may not, e.g.
    1008x1008 (63x63). The runtimes' uneven ("anything") splits are not used: they gather shard sizes on
    the host at every exchange, which keeps them out of the compiled graph and stalls the GPU (Ulysses-2
    at 1008x1008 on 2xH200: 7.31 s against 5.05 s replicated, docs/performance.md), and exist for one
    kind of parallelism at a time over NCCL only.
    """
    return tokens >= 0 and tokens % layout.sp == 0


def replicated_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the same parameters and buffers (no weight memory): the transformer as
    it is before sequence parallelism, compile and Cache-DiT wrap it, for jobs whose sequence does not
    split evenly (``splits_evenly``).
    Take it before ``apply_sequence_parallel``: both runtimes keep their state on module and processor
    instances (cache-dit's async Ulysses patches the processor class but acts only on processors holding
    its config), so the replica stays a plain one-device transformer."""
    tensors = (*transformer.parameters(), *transformer.buffers())
    shared: dict[int, Any] = {id(tensor): tensor for tensor in tensors}
    return copy.deepcopy(transformer, shared)


@contextlib.contextmanager
def _cpu_as_one_device(device: torch.device) -> Iterator[None]:
    """Present a CPU as one accelerator device while parallelism is enabled on a CPU group (gloo).

    diffusers places each rank on ``rank % accelerator count``, which is 0 on a CPU, and cache-dit's VAE
    split builds its mesh on ``torch.accelerator.current_accelerator()``, which is None there. Only for
    CPU groups, where the tests check the group protocol and the numerics without GPUs; CUDA groups
    never take this path.
    """
    if device.type != "cpu":
        yield
        return
    count, current = torch.accelerator.device_count, torch.accelerator.current_accelerator
    torch.accelerator.device_count = lambda: 1
    torch.accelerator.current_accelerator = lambda check_available=False: torch.device("cpu")
    try:
        yield
    finally:
        torch.accelerator.device_count = count
        torch.accelerator.current_accelerator = current
