"""A FLUX.1 call's starting noise drawn on a host thread while the pipeline encodes the prompt.

``FluxPipeline`` draws its noise after the text encoders, on the CPU: the jobs' generators are CPU ones, so
a seed gives the same image on any device. The GPU waits meanwhile, 7-10 ms an image on an H100's host
(lease 59's profiles: the gap under ``aten::randn``), and a batch waits that long for each of its images.
Drawn on a thread from the start of the call, the noise is ready by the time the pipeline asks for it.

The thread draws with copies of the call's generators, through diffusers' own ``randn_tensor``: the same
noise, bit for bit. The pipeline's ``prepare_latents`` gets it only if it asks for exactly what was drawn
(shape, dtype, the same generators); otherwise it draws as usual with the generators, which the thread
left untouched. Other pipelines (Kontext, FLUX.2) draw their own noise as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

LATENT_CHANNELS = 16  # FLUX.1's transformer takes 64 packed channels: 16 latent channels in 2x2 patches
_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxgate-noise")


def noise_shape(pipeline: Any, kwargs: dict[str, Any]) -> tuple[int, int, int, int]:
    """The unpacked noise ``FluxPipeline.prepare_latents`` draws for a call with ``kwargs``."""
    prompts = kwargs["prompt"]
    batch = (len(prompts) if isinstance(prompts, list) else 1) * kwargs.get("num_images_per_prompt", 1)
    scale = pipeline.vae_scale_factor * 2
    return (batch, LATENT_CHANNELS, 2 * (kwargs["height"] // scale), 2 * (kwargs["width"] // scale))


def _copies(generators: list[torch.Generator]) -> list[torch.Generator]:
    copies = []
    for generator in generators:
        copy = torch.Generator(device=generator.device)
        copy.set_state(generator.get_state())
        copies.append(copy)
    return copies


def _draw(shape: tuple[int, ...], generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    return randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=dtype)


@contextlib.contextmanager
def noise_drawn_ahead(pipeline: Any, kwargs: dict[str, Any]) -> Iterator[None]:
    """In the block, a ``FluxPipeline`` call with ``kwargs`` takes noise drawn on a thread from its start."""
    generators = kwargs.get("generator")
    if not (
        type(pipeline).__name__ == "FluxPipeline"
        and kwargs.get("latents") is None
        and isinstance(generators, list)
        and all(generator.device.type == "cpu" for generator in generators)
    ):
        yield
        return
    shape, dtype = noise_shape(pipeline, kwargs), pipeline.text_encoder.dtype  # the prompt embeddings' dtype
    future = _DRAWER.submit(_draw, shape, _copies(generators), dtype)
    pipeline.prepare_latents = _taking(pipeline, future, shape, dtype, generators)
    try:
        yield
    finally:
        del pipeline.prepare_latents  # the class's method again
        # never leave a draw running past the call; a failed draw whose noise was taken raised there
        with contextlib.suppress(Exception):
            future.result()


def _taking(
    pipeline: Any,
    future: Future[torch.Tensor],
    drawn: tuple[int, ...],
    drawn_dtype: torch.dtype,
    generators: list[torch.Generator],
) -> Any:
    original = type(pipeline).prepare_latents

    def prepare_latents(
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Any,
        latents: torch.Tensor | None = None,
    ) -> Any:
        scale = pipeline.vae_scale_factor * 2
        shape = (batch_size, num_channels_latents, 2 * (int(height) // scale), 2 * (int(width) // scale))
        if latents is None and generator is generators and shape == drawn and dtype == drawn_dtype:
            noise = future.result().to(device)
            latents = pipeline._pack_latents(noise, *shape)
        return original(
            pipeline, batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )

    return prepare_latents
