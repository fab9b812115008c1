"""Cache-DiT presets in a worker group: what the per-request controller does for cache-dit's sequence
parallelism, which the group enables once, at load (docs/design.md, "Cache-DiT under sequence
parallelism"). Paths are under ``cache_dit/caching`` (cache-dit 1.5.3)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


class KeepParallelism:
    """Keeps cache-dit's sequence parallelism, enabled once at load, across ``disable_cache``.

    ``disable_cache`` deletes the markers ``enable_parallelism`` left on the transformer and its extra
    modules (``remove_parallelism_stats``, ``cache_adapters/cache_adapter.py:629-636``) though the
    split/gather hooks stay. Without them the next ``enable_cache`` applies the FLUX.1 patch functor
    (``patch_functors/functor_base.py:43``), whose forward replaces the hooked one, and each rank then
    computes the whole sequence where its shard is expected (seen on CPU ranks: an output of 32 tokens
    for a latent of 16). It also rebinds the forward it saved with ``__get__`` (``cache_adapter.py:553``),
    which the hooks' ``functools.partial`` lacks, so that forward is presented as a bound method.
    """

    MARKERS = ("_is_parallelized", "_parallelism_config", "_extra_parallel_modules")

    def __init__(self, transformer: Any) -> None:
        modules = [transformer, *getattr(transformer, "_extra_parallel_modules", [])]
        self._markers = [
            (module, {name: getattr(module, name) for name in self.MARKERS if hasattr(module, name)})
            for module in modules
        ]
        hooked = vars(transformer).get("forward")
        parallel = getattr(transformer, "_is_parallelized", False)
        if parallel and callable(hooked) and not isinstance(hooked, types.MethodType):
            transformer.forward = types.MethodType(_calling(hooked), transformer)

    def restore(self) -> None:
        for module, markers in self._markers:
            for name, value in markers.items():
                setattr(module, name, value)


def _calling(function: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return forward


def check_parallelism_is_cache_dits(transformer: Any) -> None:
    """Under diffusers' context parallelism a cached step returns the whole sequence where the rank's
    shard is expected (seen on CPU ranks); cache-dit's own parallelism marks the transformer."""
    if getattr(transformer, "_parallel_config", None) is not None and not getattr(
        transformer, "_is_parallelized", False
    ):
        raise ValueError(
            "Cache-DiT presets in a group need cache-dit's sequence parallelism (--sp-runtime cache-dit), "
            "not diffusers' context parallelism"
        )
