"""Sequence parallelism of the transformer (Ulysses, Ring) through diffusers' context parallelism.

Every rank of a worker group holds the whole pipeline; ``enable_parallelism`` splits the transformer's
sequence (text and image tokens) across the ranks, and attention exchanges heads (Ulysses, an
all-to-all) or key/value blocks (Ring) so that each rank computes exact attention over the whole
sequence. The rest of the pipeline (text encoders, VAE) runs replicated: every rank gets the same
latents from the same seed, and rank 0's image is the result.

We use diffusers' ``ContextParallelConfig`` and not cache-dit's ``ParallelismConfig`` (never both:
../shared/reference/libraries.md); cache-dit's cache decision is averaged over the world group when
one is initialised, so every rank caches the same steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("fluxgate.parallel")

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


class ParallelError(ValueError):
    """The group's degrees do not fit this model or backend; the message names the flag to change."""


@dataclass(frozen=True)
class ParallelLayout:
    """How a worker group splits the work: sequence parallel degrees and text-encoder tensor parallel."""

    ulysses: int = 1
    ring: int = 1
    tp: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def describe(self) -> str:
        return f"ulysses={self.ulysses},ring={self.ring},tp={self.tp}"


def attention_backend_for(layout: ParallelLayout, chosen: str | None, device: torch.device) -> str | None:
    """The attention backend a layout runs on: the chosen one if it can, else Ring's default on CUDA."""
    if layout.sp == 1:
        return chosen
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


def check_heads(pipe: Any, layout: ParallelLayout) -> None:
    """Ulysses gives each rank whole attention heads, so the degree must divide the head count."""
    heads = int(pipe.transformer.config.num_attention_heads)
    if heads % layout.ulysses:
        raise ParallelError(
            f"--ulysses-degree {layout.ulysses} must divide the transformer's {heads} attention heads"
        )


def apply_context_parallel(pipe: Any, layout: ParallelLayout, device: torch.device) -> None:
    """Split the transformer's sequence over the group (once per process, after the attention backend)."""
    from diffusers import ContextParallelConfig

    check_heads(pipe, layout)
    config = ContextParallelConfig(ulysses_degree=layout.ulysses, ring_degree=layout.ring)
    with _one_device_on_cpu(device):
        pipe.transformer.enable_parallelism(config=config)
    log.info("sequence parallel over %d ranks (%s)", layout.sp, layout.describe)


def prepare_sequence_split(pipe: Any, tokens: int, layout: ParallelLayout) -> bool:
    """Choose the even split (fast) or diffusers' uneven one for this job's image-token count; True
    when uneven. The uneven split gathers shard sizes on the host, which torch.compile cannot trace,
    so a compiled engine runs such a job eagerly.

    Plain Ulysses and Ring need the sequence to divide by the degree; FLUX's 512 text tokens always do,
    image tokens ((width/16) x (height/16), plus reference-image tokens) may not, e.g. 1008x1008.
    The uneven ("anything") modes exist for one kind of parallelism at a time, so a Ulysses x Ring
    group refuses such sizes.
    """
    if layout.sp == 1:
        return False
    config = pipe.transformer._parallel_config.context_parallel_config
    uneven = tokens % layout.sp != 0
    if uneven and layout.ulysses > 1 and layout.ring > 1:
        if tokens < 0:
            raise ParallelError(
                f"this worker group (Ulysses {layout.ulysses} x Ring {layout.ring}) does not take reference "
                "images: their token count varies, and only a single kind of parallelism splits any length"
            )
        raise ParallelError(
            f"this worker group (Ulysses {layout.ulysses} x Ring {layout.ring}) needs the image token count "
            f"({tokens}) to divide by {layout.sp}; use a width and height that are multiples of "
            f"{16 * layout.sp}"
        )
    if uneven and not torch.cuda.is_available():
        raise ParallelError(
            f"a CPU worker group (gloo) needs the image token count ({tokens}) to divide by {layout.sp}: "
            "gloo gathers only equal shards"
        )
    config.ulysses_anything = uneven and layout.ulysses > 1
    config.ring_anything = uneven and layout.ring > 1
    return uneven


@contextlib.contextmanager
def _one_device_on_cpu(device: torch.device) -> Iterator[None]:
    """diffusers places each rank on ``rank % accelerator count``, which is 0 on a CPU: present one.

    Only for CPU groups (gloo), where the tests check the group protocol and the numerics of Ulysses
    without GPUs; CUDA groups never take this path.
    """
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
