"""The transformer's forward replayed as a CUDA graph, one per input signature (``--compile``).

A FLUX.1 step launches some 3,000 kernels from Python. Under ``--quantize fp8`` an H100 runs them in about
as long as the host takes to launch them, a Celery worker process launches them more slowly still (its
50-step fp8 image took 5.99 s, 5.17 s replayed), and a sequence-parallel group's ranks are host-bound
too (docs/performance.md). A graph captured once per signature (shapes and dtypes of the tensor arguments,
values of the others) launches the whole forward at once: each later call copies its tensors into the
graph's input buffers, replays it and returns a clone of its outputs. The kernels are the same, so the
result is the same to the bit.

Where it applies (the engine decides, ``worker.engine.step_graphs_apply``): a resident, unsharded
transformer on CUDA, alone or in a Ulysses/Ring group (whose ranks capture their exchanges at the same
call: they run in lockstep), in calls without Cache-DiT hooks (their per-step decisions read values on
the host) and without autograd. A signature whose capture fails runs eagerly from then on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

log = logging.getLogger("fluxgate.cuda_graphs")

Replay = Callable[[], None]
Key = tuple[Any, tuple[Hashable, ...]]  # the arguments' tree structure, and their signature


class Recorder(Protocol):
    """Captures ``run`` once; returns a replay of it and the outputs that each replay rewrites."""

    def capture(self, run: Callable[[], Any]) -> tuple[Replay, Any]: ...


class CudaRecorder:
    """CUDA graphs on ``device``: a warm-up run then the capture, both on one side stream, as torch's
    documentation does it (lazy per-stream state such as cuBLAS workspaces exists before the capture).

    All graphs share one memory pool: one replays at a time and its outputs are cloned before the next,
    so the pool is as large as the largest forward's activations, not their sum.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, run: Callable[[], Any]) -> tuple[Replay, Any]:
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            run()
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's CUDA calls must be capturable, not the worker's other threads'
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            output = run()
        caller.wait_stream(self.stream)
        return graph.replay, output


@dataclass(frozen=True)
class GraphConfig:
    max_graphs: int = 8  # signatures kept (resolutions x batch sizes); the least recently used goes

    def __post_init__(self) -> None:
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {self.max_graphs}")


@dataclass
class CapturedCall:
    """One signature's graph: its input buffers (``None`` for a non-tensor argument) and outputs."""

    buffers: list[torch.Tensor | None]
    outputs: Any
    replay: Replay

    def __call__(self, leaves: list[Any]) -> Any:
        for buffer, leaf in zip(self.buffers, leaves, strict=True):
            if buffer is not None:
                buffer.copy_(leaf)
        self.replay()
        return tree_map_only(torch.Tensor, torch.clone, self.outputs)


def on_device(place: torch.device, device: torch.device) -> bool:
    """Whether ``place`` is ``device``; ``cuda`` without an index (``--device cuda``) is any CUDA device,
    as the pipeline's tensors are all on the current one."""
    if place.type != device.type:
        return False
    return device.index is None or place.index is None or place.index == device.index


def signature(leaves: list[Any], device: torch.device) -> tuple[Hashable, ...] | None:
    """What a graph is captured for: each tensor's shape and dtype, each other argument's value.

    ``None`` where a graph cannot serve the call: a tensor on another device, one that needs gradients,
    or an argument that is not hashable (its value could change unseen).
    """
    parts: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not on_device(leaf.device, device) or leaf.requires_grad:
                return None
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype))
            continue
        try:
            hash(leaf)
        except TypeError:
            return None
        parts.append((type(leaf), leaf))
    return tuple(parts)


class GraphedCalls:
    """Replays ``run``'s calls as CUDA graphs: each signature's graph is captured at its first call,
    and each later call copies its tensors into the graph's input buffers and replays it."""

    def __init__(
        self, run: Callable[..., Any], recorder: Recorder, device: torch.device, config: GraphConfig
    ) -> None:
        self._run = run
        self._recorder = recorder
        self._device = device
        self._max_graphs = config.max_graphs
        self.captured: OrderedDict[Key, CapturedCall] = OrderedDict()
        self.refused: set[Key] = set()  # signatures whose capture failed: eager from then on

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        parts = signature(leaves, self._device) if not torch.is_grad_enabled() else None
        key = None if parts is None else (spec, parts)
        if key is None or key in self.refused:
            return self._run(*args, **kwargs)
        call = self.captured.get(key)
        if call is None:
            call = self._capture(key, leaves, spec)
            if call is None:
                return self._run(*args, **kwargs)
        self.captured.move_to_end(key)
        return call(leaves)

    def _capture(self, key: Key, leaves: list[Any], spec: Any) -> CapturedCall | None:
        # contiguous buffers: the warm-up and the capture see the same tensors, so no recompile between
        buffers = [
            leaf.detach().clone(memory_format=torch.contiguous_format)
            if isinstance(leaf, torch.Tensor)
            else None
            for leaf in leaves
        ]
        arguments = [leaf if buffer is None else buffer for leaf, buffer in zip(leaves, buffers, strict=True)]
        args, kwargs = tree_unflatten(arguments, spec)
        try:
            replay, outputs = self._recorder.capture(lambda: self._run(*args, **kwargs))
        except Exception:  # the call did something a graph cannot hold; it still runs eagerly
            log.warning("CUDA graph capture failed; this signature runs eagerly", exc_info=True)
            self.refused.add(key)
            return None
        call = CapturedCall(buffers, outputs, replay)
        self.captured[key] = call
        while len(self.captured) > self._max_graphs:
            self.captured.popitem(last=False)
        log.info("CUDA graph captured (%d kept)", len(self.captured))
        return call


class StepGraphs(GraphedCalls):
    """Stands in for ``module`` where the pipeline calls it: each call replays its signature's graph,
    captured at the signature's first call. Attributes are the module's (config, dtype, cache_context)."""

    def __init__(
        self, module: torch.nn.Module, recorder: Recorder, device: torch.device, config: GraphConfig
    ) -> None:
        super().__init__(module, recorder, device, config)
        self.module = module  # the names above are the graphs'; the rest are the module's (``__getattr__``)

    def __getattr__(self, name: str) -> Any:
        if name == "module":  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.module, name)


def apply_step_graphs(
    module: torch.nn.Module, device: torch.device, config: GraphConfig, recorder: Recorder | None = None
) -> StepGraphs:
    """``module``'s calls replayed as CUDA graphs on ``device`` (see the module docstring for where);
    ``recorder``: one whose memory pool other graphs of the engine share."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    return StepGraphs(module, recorder or CudaRecorder(device), device, config)
