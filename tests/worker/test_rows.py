"""``--one-pass-rows``: inductor's persistent-reduction limit raised while the engine may compile, in the
compile caches' keys, and nowhere else."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations.rows import OnePassRows, RowLimitKey, one_pass_rows
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline


def test_the_choices_and_the_cache_key_hold_inside_the_block_only() -> None:
    before = type(V.choices)
    with one_pass_rows(4096):
        assert isinstance(V.choices, OnePassRows) and V.choices.limit == 4096
        key = torch._inductor.config.post_grad_custom_pre_pass
        assert isinstance(key, RowLimitKey) and key.uuid() == "fluxgate-one-pass-rows-4096"
    assert type(V.choices) is before
    assert torch._inductor.config.post_grad_custom_pre_pass is None
    with one_pass_rows(0):  # inductor's own choices
        assert not isinstance(V.choices, OnePassRows)
        assert torch._inductor.config.post_grad_custom_pre_pass is None


def test_someone_elses_post_grad_pass_is_kept_and_the_cache_left_out() -> None:
    theirs = RowLimitKey(7)
    with torch._inductor.config.patch(post_grad_custom_pre_pass=theirs), one_pass_rows(4096):
        assert torch._inductor.config.post_grad_custom_pre_pass is theirs
        assert torch._inductor.config.fx_graph_cache is False
        assert isinstance(V.choices, OnePassRows)


def test_inner_rows_up_to_the_limit_reduce_in_registers_and_others_keep_inductors_choice() -> None:
    sizevars = SimpleNamespace(statically_known_leq=lambda numel, limit: numel <= limit)
    graph = SimpleNamespace(sizevars=sizevars)

    def features(numel: int, hint: ReductionHint) -> SimpleNamespace:
        return SimpleNamespace(reduction_numel=numel, get_reduction_hint=lambda: hint)

    choices = OnePassRows(4096)
    with V.set_graph_handler(graph):  # type: ignore[arg-type]
        assert choices.should_use_persistent_reduction(features(3072, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(features(15360, ReductionHint.INNER), False)
        default = InductorChoices.should_use_persistent_reduction
        assert not default(features(3072, ReductionHint.INNER), False)  # inductor's own limit: 1,024


def test_kernels_compiled_under_one_limit_are_not_loaded_under_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def layer_norm(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],)) * 2 + 1

    x = torch.randn(4, 3072)

    def compile_misses(limit: int) -> int:
        torch._dynamo.reset()
        before = counters["inductor"]["fxgraph_cache_miss"]
        with torch._inductor.config.patch(fx_graph_cache=True), one_pass_rows(limit):
            result = torch.compile(layer_norm, dynamic=False)(x)
        torch.testing.assert_close(result, layer_norm(x), atol=1e-5, rtol=1e-5)
        return counters["inductor"]["fxgraph_cache_miss"] - before

    assert compile_misses(4096) == 1
    assert compile_misses(4096) == 0  # the same limit: loaded from the cache
    assert compile_misses(0) == 1  # another limit: compiled afresh
    torch._dynamo.reset()


def test_the_engine_compiles_under_the_limit_only_with_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine = engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(device="cpu"), torch.device("cpu"))
    assert engine.row_limit == 0
    engine.row_limit = 4096  # as --compile sets it (compiling the tiny model here would only cost time)

    def call(self: object, **kwargs: object) -> SimpleNamespace:
        seen.append(V.choices)
        return SimpleNamespace(images=[])

    monkeypatch.setattr(type(pipe), "__call__", call)
    monkeypatch.setattr(engine_module, "to_pil", lambda images: [])
    engine._run(pipe.transformer, None, {})
    assert isinstance(seen[0], OnePassRows) and seen[0].limit == 4096
    assert not isinstance(V.choices, OnePassRows)


def test_one_pass_rows_option_defaults_to_4096_under_compile() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).one_pass_rows == 4096
    assert engine_options(parser.parse_args(["--one-pass-rows", "0"])).one_pass_rows == 0
    with pytest.raises(ValueError, match="one_pass_rows"):
        EngineOptions(one_pass_rows=-1)
    pipe = build_tiny_pipeline("flux1", seed=0)
    compiled = engine_module.FluxEngine.from_pipeline(
        pipe, EngineOptions(device="cpu", compile=True), torch.device("cpu")
    )
    assert compiled.row_limit == 4096
