"""bench.wide_rows: inductor's persistent-reduction choice widened for the compile inside it, only there."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch._functorch.config
import torch._inductor.config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from bench.wide_rows import WideRowChoices, wide_rows


def test_the_choices_and_the_cache_settings_hold_inside_the_block_only() -> None:
    before = type(V.choices)
    with wide_rows(16384):
        assert isinstance(V.choices, WideRowChoices) and V.choices.max_row == 16384
        assert torch._inductor.config.fx_graph_cache is False  # the hook is not in the cache key
        assert torch._functorch.config.enable_autograd_cache is False
    assert type(V.choices) is before
    with wide_rows(None):
        assert not isinstance(V.choices, WideRowChoices)


def test_inner_rows_up_to_the_limit_reduce_in_registers_and_others_keep_inductors_choice() -> None:
    sizevars = SimpleNamespace(statically_known_leq=lambda numel, limit: numel <= limit)
    graph = SimpleNamespace(sizevars=sizevars)

    def features(numel: int, hint: ReductionHint) -> SimpleNamespace:
        return SimpleNamespace(reduction_numel=numel, get_reduction_hint=lambda: hint)

    choices = WideRowChoices(16384)
    with V.set_graph_handler(graph):  # type: ignore[arg-type]
        assert choices.should_use_persistent_reduction(features(15360, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(features(32768, ReductionHint.INNER), False)
        default = InductorChoices.should_use_persistent_reduction
        assert not default(features(15360, ReductionHint.INNER), False)


def test_a_compile_inside_gives_the_eager_result() -> None:
    def amax_scaled(x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().amax(dim=-1, keepdim=True)

    x = torch.randn(4, 3000)
    with wide_rows(16384):
        compiled = torch.compile(amax_scaled, dynamic=False)(x)
    torch.testing.assert_close(compiled, amax_scaled(x))
