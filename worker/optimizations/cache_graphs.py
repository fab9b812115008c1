"""Cache-DiT's block runs replayed as CUDA graphs (``--compile`` with a cache preset).

Under a Cache-DiT preset cache-dit's blocks wrapper (``CachedBlocks_Pattern_Base.forward``, cache-dit 1.5.3,
``cache_dit/caching/cache_blocks/pattern_base.py``) decides on the host at every step whether the middle
blocks run or their stored residual stands in for them, and keeps its residuals in Python between steps.
A graph of the whole transformer call (``cuda_graphs.StepGraphs``) would freeze one step's decision, so
those calls ran without graphs: `fast`'s computed steps launched their 57 compiled blocks from Python and
left the GPU ~0.06 s more idle an image than the graphed lossless steps (lease 56, docs/performance.md).

Here the runs of blocks the wrapper makes (its ``call_Fn_blocks``, ``call_Mn_blocks`` and
``call_Bn_blocks``: FLUX.1's first block, then the other 18 double and 38 single blocks as one run, since
cache-dit's FLUX.1 adapter chains both lists) are each replayed as a graph, one per signature, with
cache-dit's decisions and buffers on the host between them as before. Each run is pure computation on its
inputs (the blocks, and the middle run's residuals), and its outputs are clones (``GraphedCalls``), so
what cache-dit keeps across steps is never a graph's memory. The block counts (``Fn``/``Bn``) are part of
each graph's signature.

The wrapper's methods are replaced once, on cache-dit's class, by ones that use the graphs only for a
transformer given them (``apply_cache_block_graphs``); every other transformer runs cache-dit's code.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from cache_dit.caching.cache_blocks.pattern_base import CachedBlocks_Pattern_Base

from worker.optimizations.cuda_graphs import GraphConfig, GraphedCalls, Recorder

SEGMENTS = ("call_Fn_blocks", "call_Mn_blocks", "call_Bn_blocks")
SETTINGS_ATTRIBUTE = "_fluxgate_block_graphs"  # on the transformer: its BlockGraphSettings
GRAPHS_ATTRIBUTE = "_fluxgate_segment_graphs"  # on cache-dit's wrapper: {segment: GraphedCalls}
ORIGINALS_ATTRIBUTE = "_fluxgate_original_segments"  # on cache-dit's class: its own methods


class BlockGraphSettings:
    """Where a transformer's block runs are captured: the engine's recorder (its shared memory pool)."""

    def __init__(self, recorder: Recorder, device: torch.device, config: GraphConfig) -> None:
        self.recorder = recorder
        self.device = device
        self.config = config
        self.runs: weakref.WeakSet[GraphedCalls] = weakref.WeakSet()  # those of cache-dit's live wrappers

    def counts(self) -> dict[str, int]:
        """Graphs held and signatures refused, over the block runs of cache-dit's live wrappers."""
        runs = list(self.runs)
        return {"captured": sum(len(r.captured) for r in runs), "refused": sum(len(r.refused) for r in runs)}


def segment_length(blocks: Any, segment: str) -> int:
    """How many blocks ``segment`` runs under the wrapper's current cache context."""
    manager = blocks.context_manager
    if segment == "call_Fn_blocks":
        return int(manager.Fn_compute_blocks())
    if segment == "call_Bn_blocks":
        return int(manager.Bn_compute_blocks())
    return len(blocks._Mn_blocks())


def _graphs_for(blocks: Any, segment: str, settings: BlockGraphSettings, original: Callable[..., Any]) -> Any:
    graphs: dict[str, GraphedCalls] = blocks.__dict__.setdefault(GRAPHS_ATTRIBUTE, {})
    if segment not in graphs:
        # Fn and Bn only key the graph: the run reads them from the cache context, as cache-dit's does
        def run(fn: int, bn: int, *args: Any, **kwargs: Any) -> Any:
            return original(blocks, *args, **kwargs)

        graphs[segment] = GraphedCalls(run, settings.recorder, settings.device, settings.config)
        settings.runs.add(graphs[segment])
    return graphs[segment]


def _graphed(segment: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: Any, hidden_states: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        settings = getattr(self.transformer, SETTINGS_ATTRIBUTE, None)
        if settings is None or segment_length(self, segment) == 0:  # nothing to replay: cache-dit's own
            return original(self, hidden_states, encoder_hidden_states, *args, **kwargs)
        manager = self.context_manager
        graphs = _graphs_for(self, segment, settings, original)
        fn, bn = int(manager.Fn_compute_blocks()), int(manager.Bn_compute_blocks())
        return graphs(fn, bn, hidden_states, encoder_hidden_states, *args, **kwargs)

    call.__name__ = call.__qualname__ = segment
    call.__doc__ = original.__doc__
    return call


def install_segment_graphs() -> None:
    """Replace cache-dit's block-run methods with the graph-aware ones (once; idempotent)."""
    if ORIGINALS_ATTRIBUTE in vars(CachedBlocks_Pattern_Base):
        return
    originals = {segment: vars(CachedBlocks_Pattern_Base)[segment] for segment in SEGMENTS}
    setattr(CachedBlocks_Pattern_Base, ORIGINALS_ATTRIBUTE, originals)
    for segment, original in originals.items():
        setattr(CachedBlocks_Pattern_Base, segment, _graphed(segment, original))


def apply_cache_block_graphs(
    transformer: torch.nn.Module, recorder: Recorder, device: torch.device, config: GraphConfig
) -> None:
    """``transformer``'s block runs under Cache-DiT replayed as CUDA graphs recorded by ``recorder``."""
    install_segment_graphs()
    setattr(transformer, SETTINGS_ATTRIBUTE, BlockGraphSettings(recorder, device, config))
