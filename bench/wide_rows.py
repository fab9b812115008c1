"""Inductor keeping rows of up to 16,384 elements in registers (one pass) instead of 1,024 (an experiment).

Inductor turns a reduction along a row into a "persistent" kernel, the row loaded once and normalised or
scaled from registers, only up to 1,024 elements; longer rows loop over memory twice or split the reduction
and its consumer into two kernels. FLUX.1's fp8 single blocks reduce rows of 15,360 (the per-row amax of the
attention output and the MLP's GELU before ``proj_out``): two kernels, 0.32 s an image on an H100 at ~1 TB/s
(docs/performance.md, lease 24). Multi-kernel, which raises the limit 16x and times both forms, fails to load
its kernels under torch 2.11. ``wide_rows`` raises the limit without the timing, through inductor's
``InductorChoices`` hook; the FX-graph and autograd caches are off meanwhile (the hook is not in their keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch._functorch.config
import torch._inductor.config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class WideRowChoices(InductorChoices):
    def __init__(self, max_row: int) -> None:
        super().__init__()
        self.max_row = max_row

    def should_use_persistent_reduction(  # type: ignore[override]
        self, features: Any, cooperative_reduction: bool
    ) -> bool:
        inner = features.get_reduction_hint() == ReductionHint.INNER and not cooperative_reduction
        if inner and torch._inductor.config.triton.persistent_reductions:
            return bool(V.graph.sizevars.statically_known_leq(features.reduction_numel, self.max_row))
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


@contextlib.contextmanager
def wide_rows(max_row: int | None) -> Iterator[None]:
    """Compile with rows of up to ``max_row`` elements reduced in registers (None: inductor's choices)."""
    if max_row is None:
        yield
        return
    inductor_cache_off = torch._inductor.config.patch({"fx_graph_cache": False})
    autograd_cache_off = torch._functorch.config.patch({"enable_autograd_cache": False})
    with inductor_cache_off, autograd_cache_off, V.set_choices_handler(WideRowChoices(max_row)):
        yield
