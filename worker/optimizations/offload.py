"""CPU offload with prefetch (diffusers group offloading), and a GPU memory budget.

Offloaded components live on the CPU and are streamed to the GPU group by group while the previous
group computes: on CUDA a side stream prefetches the next group (``use_stream``), so the copy hides
behind compute when the link is fast enough. ``--pin-cpu-memory`` pins every weight up front (the
fastest copies, ~1x the model in page-locked host RAM); without it weights are pinned on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import apply_group_offloading

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class OffloadConfig:
    dit: bool = False
    text_encoder: bool = False
    vae: bool = False
    pin_memory: bool = False
    gpu_memory_budget_gb: float | None = None
    blocks_per_group: int = 2  # the worker's default (EngineOptions.offload_blocks_per_group)


def component_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def plan_budget(pipe: Any, budget_gb: float) -> set[str]:
    """The components to offload so that the resident ones fit ``budget_gb``: largest first."""
    sizes = {name: component_bytes(getattr(pipe, name)) for name in _components(pipe)}
    budget = budget_gb * 1e9
    offloaded: set[str] = set()
    for name in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if sum(size for other, size in sizes.items() if other not in offloaded) <= budget:
            break
        offloaded.add(name)
    return offloaded


def _components(pipe: Any) -> list[str]:
    names = ["transformer", "vae", *TEXT_ENCODERS]
    return [name for name in names if isinstance(getattr(pipe, name, None), torch.nn.Module)]


def offloaded_components(pipe: Any, config: OffloadConfig) -> set[str]:
    if config.gpu_memory_budget_gb is not None:
        chosen = plan_budget(pipe, config.gpu_memory_budget_gb)
        return chosen | ({"vae"} if config.vae else set())
    chosen = {"transformer"} if config.dit else set()
    chosen |= set(TEXT_ENCODERS) if config.text_encoder else set()
    chosen |= {"vae"} if config.vae else set()
    return chosen & set(_components(pipe))


def apply_offload(
    pipe: Any, config: OffloadConfig, device: torch.device, placed_elsewhere: frozenset[str] = frozenset()
) -> set[str]:
    """Place every component: offloaded ones stream from the CPU, the rest move to ``device``.

    The transformer is offloaded block by block (its repeated blocks are the unit of compute);
    text encoders and the VAE leaf by leaf. Components in ``placed_elsewhere`` are left where they
    are: a text encoder or transformer sharded over a worker group lands on the GPU one shard at a
    time (``worker.tensor_parallel``); moving it whole first would need all of it on every GPU. Returns
    the names of the offloaded components.
    """
    offloaded = offloaded_components(pipe, config) - placed_elsewhere
    use_stream = device.type == "cuda"
    for name in _components(pipe):
        if name in placed_elsewhere:
            continue
        module = getattr(pipe, name)
        if name not in offloaded:
            module.to(device)
            continue
        block_level = name == "transformer"
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level" if block_level else "leaf_level",
            num_blocks_per_group=config.blocks_per_group if block_level else None,
            use_stream=use_stream,
            record_stream=use_stream,
            non_blocking=use_stream,
            low_cpu_mem_usage=use_stream and not config.pin_memory,
        )
    return offloaded
