"""diffusers' execution-device lookups answered once per component (``settle_devices``).

Every FLUX pipeline call asks where its components run: ``DiffusionPipeline._execution_device`` at the
call's start, then ``get_module_execution_device`` for each text encoder before its input ids move and for
the VAE before the decode. Each answer walks every submodule of the components it visits, looking for
offload hooks: FLUX.1-dev's four models hold 2,135 modules, and the walks take 8 + 4 ms a call on this
2-core machine (``bench.host_lookups``, the architecture built on the meta device). It is host time the GPU
waits through: an H100's profile of one image shows it idle 2.9-4.8 ms before the first text encoder and
1.4-2.5 ms before the second (lease 66, docs/performance.md).

A worker's components neither move nor gain hooks once its engine is built (placement, offload hooks,
sequence parallelism and compile all come first), so ``settle_devices`` takes each answer then and keeps
it: the pipeline's and, per component and stand-in (the encoders' and the steps' CUDA graphs), the
module's. Lookups for anything not settled, and for other pipelines in the process, are diffusers' own.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import torch_utils

_pipelines: weakref.WeakKeyDictionary[Any, torch.device] = weakref.WeakKeyDictionary()
_modules: weakref.WeakKeyDictionary[Any, torch.device] = weakref.WeakKeyDictionary()

_diffusers_execution_device: property = vars(DiffusionPipeline)["_execution_device"]
_diffusers_module_device: Callable[[Any], torch.device] = torch_utils.get_module_execution_device


def _execution_device(pipeline: Any) -> Any:
    settled = _pipelines.get(pipeline)
    return settled if settled is not None else _diffusers_execution_device.fget(pipeline)  # type: ignore[misc]


def module_execution_device(module: Any) -> torch.device:
    """``get_module_execution_device``, from the kept answer where ``module`` is settled."""
    try:
        settled = _modules.get(module)
    except TypeError:  # neither hashable nor weakly referenced: never settled
        settled = None
    return settled if settled is not None else _diffusers_module_device(module)


def _install(pipeline_class: type) -> None:
    """Route the lookups through the kept answers: the property on ``DiffusionPipeline`` (once), and the
    function where the pipeline's module imported it by name."""
    if vars(DiffusionPipeline)["_execution_device"] is _diffusers_execution_device:
        setattr(DiffusionPipeline, "_execution_device", property(_execution_device))  # noqa: B010
    namespace = vars(sys.modules[pipeline_class.__module__])
    if namespace.get("get_module_execution_device") is _diffusers_module_device:
        namespace["get_module_execution_device"] = module_execution_device


def settle_devices(pipeline: Any, stand_ins: Iterable[Any] = ()) -> None:
    """From now on answer ``pipeline``'s execution-device lookups, and those of its components and of
    ``stand_ins`` (objects the engine swaps in for components), with what diffusers answers now."""
    _install(type(pipeline))
    _pipelines[pipeline] = _diffusers_execution_device.fget(pipeline)  # type: ignore[misc]
    components = [part for part in pipeline.components.values() if isinstance(part, torch.nn.Module)]
    for part in [*components, *stand_ins]:
        _modules[part] = _diffusers_module_device(part)
