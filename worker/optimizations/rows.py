"""Inductor reducing rows of up to 4,096 elements in one pass, from registers (``--one-pass-rows``).

Inductor turns a reduction along a row into a "persistent" kernel (the row loaded once, reduced and then
normalised or scaled from registers) only up to 1,024 elements; longer rows loop over memory twice. FLUX.1's
adaLN LayerNorms reduce rows of 3,072 (the hidden size), 114 of them a step with the residual adds and
modulation fused around them. On an H100 the limit at 4,096 takes 0.045 s of elementwise kernels off a bf16
image, 0.4% of it, and 2.0% off fp8 with fp8 attention (docs/performance.md, lease 50). At 4,096 the fp8
path's 12,288- and 15,360-wide quantization rows stay as they were (lease 26: wider made them slower).

The limit is inductor's ``InductorChoices`` hook, which is thread-local: ``one_pass_rows`` installs it around
the calls that may compile (the engine's pipeline calls, warm-up included). A no-op post-grad pass carries the
limit into inductor's FX-graph and autograd cache keys, so kernels compiled under one limit are never loaded
under another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch._inductor.config
from torch._inductor.choices import InductorChoices
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class OnePassRows(InductorChoices):
    """Inductor's choices, with row reductions of up to ``limit`` elements persistent."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def should_use_persistent_reduction(  # type: ignore[override]
        self, features: Any, cooperative_reduction: bool
    ) -> bool:
        inner = features.get_reduction_hint() == ReductionHint.INNER and not cooperative_reduction
        if inner and torch._inductor.config.triton.persistent_reductions:
            return bool(V.graph.sizevars.statically_known_leq(features.reduction_numel, self.limit))
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


class RowLimitKey(CustomGraphPass):
    """Changes nothing in the graph; its ``uuid`` puts the limit into inductor's cache keys."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"fluxgate-one-pass-rows-{self.limit}"


@contextlib.contextmanager
def one_pass_rows(limit: int) -> Iterator[None]:
    """Compile with rows of up to ``limit`` elements reduced in one pass (0: inductor's choices)."""
    if limit <= 0:
        yield
        return
    if torch._inductor.config.post_grad_custom_pre_pass is None:
        key = torch._inductor.config.patch(post_grad_custom_pre_pass=RowLimitKey(limit))
    else:  # the slot holds someone else's pass: keep it, and compile without the caches instead
        key = torch._inductor.config.patch(fx_graph_cache=False)
    with key, V.set_choices_handler(OnePassRows(limit)):
        yield
