"""--deferred-gating: each single block but the last leaves its gating to the next block's norm kernel; the
same output, compiled over resolutions in both modes, and off in calls that Cache-DiT's hooks run."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.engine import FluxEngine, internal_params
from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit
from worker.optimizations.compile import RECOMPILE_LIMIT, CompileConfig, apply_regional_compile
from worker.optimizations.epilogues import (
    PendingGating,
    apply_gemm_epilogues,
    defer_gating,
    image_rows_last,
)
from worker.optimizations.qk_norm_rope import apply_fused_qk_norm_rope
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

from .transformer_support import inputs, relative_rms, tiny_transformer


def prepared(model: Any, rows_last: bool = True) -> Any:
    apply_fused_qk_norm_rope(model)
    apply_gemm_epilogues(model)
    if rows_last:
        image_rows_last(model)
    return model


def recorded_kinds(block: Any) -> list[str]:
    """The kind of ``block``'s image output at each of its calls from now on."""
    kinds: list[str] = []
    block.register_forward_hook(lambda module, args, output: kinds.append(type(output[1]).__name__))
    return kinds


def output_kinds(model: Any) -> list[str]:
    """The kind of each single block's image output over one forward."""
    kinds: list[str] = []
    record = lambda module, args, output: kinds.append(type(output[1]).__name__)  # noqa: E731
    handles = [block.register_forward_hook(record) for block in model.single_transformer_blocks]
    with torch.no_grad():
        model(**inputs(torch.float32))
    for handle in handles:
        handle.remove()
    return kinds


@pytest.mark.parametrize("rows_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_deferred_gating_gives_the_models_output_to_the_bit(rows_last: bool, dtype: torch.dtype) -> None:
    """Eager, the deferred gating is the same operations in the same order, one block later."""
    expected = prepared(tiny_transformer(dtype), rows_last)(**inputs(dtype))[0]
    model = prepared(tiny_transformer(dtype), rows_last)
    assert defer_gating(model, True) == 2
    assert torch.equal(model(**inputs(dtype))[0], expected)


def test_each_single_block_but_the_last_leaves_its_gating_to_the_next() -> None:
    model = prepared(tiny_transformer())
    defer_gating(model, True)
    assert output_kinds(model) == ["PendingGating", "PendingGating", "Tensor"]
    assert defer_gating(model, False) == 0
    assert output_kinds(model) == ["Tensor"] * 3


def test_a_pending_gating_carries_the_unbiased_projection_and_its_bias() -> None:
    model = prepared(tiny_transformer())
    defer_gating(model, True)
    pending: list[PendingGating] = []
    model.single_transformer_blocks[0].register_forward_hook(
        lambda module, args, output: pending.append(output[1])
    )
    with torch.no_grad():
        model(**inputs(torch.float32))
    block = model.single_transformer_blocks[0]
    assert pending[0].bias is block.proj_out.bias
    assert pending[0].projected.shape == (7 + 36, 32)  # the accumulated GEMMs' rows, flattened


def test_blocks_without_the_epilogue_forward_do_not_defer() -> None:
    assert defer_gating(tiny_transformer(), True) == 0
    model = tiny_transformer()
    assert output_kinds(model) == ["Tensor"] * 3


@torch.no_grad()
def test_compiled_blocks_switch_between_deferred_and_gated_calls_at_two_resolutions() -> None:
    """The engine's order (compile, then the forwards), fullgraph: six single-block graphs a shape, each
    resolution after the first a dynamic one, within the raised recompile limit."""
    bf16 = torch.bfloat16
    model = tiny_transformer(bf16)
    apply_regional_compile(model_pipeline(model), CompileConfig())
    prepared(model)
    reference = prepared(tiny_transformer(bf16))
    for tokens in (36, 20):  # the second resolution's dynamic graphs pass dynamo's default limit of 8
        arguments = resized(inputs(bf16), tokens)
        expected = reference(**arguments)[0]
        for deferred in (True, False):
            defer_gating(model, deferred)
            assert relative_rms(model(**arguments)[0], expected) < 0.02, (tokens, deferred)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


def model_pipeline(transformer: Any) -> Any:
    return argparse.Namespace(transformer=transformer)


def resized(arguments: dict[str, Any], tokens: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(tokens)
    dtype = arguments["hidden_states"].dtype
    hidden = torch.randn(1, tokens, 16, generator=generator).to(dtype)
    return {**arguments, "hidden_states": hidden, "img_ids": torch.randn(tokens, 3, generator=generator)}


def engine_with_cache(monkeypatch: pytest.MonkeyPatch, **options: Any) -> FluxEngine:
    """The tiny pipeline's ``--compile`` engine on the CPU (no regional compile) with a ``fast`` preset, its
    transformer with three single blocks."""
    monkeypatch.setattr(engine_module, "apply_regional_compile", lambda *args: None)
    pipe = build_tiny_pipeline("flux1", seed=0)
    torch.manual_seed(0)  # three single blocks, where the tiny model has one
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "num_single_layers": 3})
    settings = EngineOptions(compile=True, compile_vae=False, cuda_graphs=False, **options)
    presets = {"fast": CacheDitConfig(enabled=True, scm_preset="fast", scm_policy="static")}
    return FluxEngine.from_pipeline(
        pipe, settings, torch.device("cpu"), lambda pipeline: apply_cache_dit(pipeline, presets)
    )


def test_the_engine_defers_gating_in_calls_without_cache_hooks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    images: dict[tuple[bool, str], torch.Tensor] = {}
    for deferred in (True, False):
        engine = engine_with_cache(monkeypatch, deferred_gating=deferred)
        assert engine.defers_gating is deferred
        kinds = recorded_kinds(engine.pipeline.transformer.single_transformer_blocks[0])
        for preset in ("off", "fast", "off"):
            kinds.clear()
            output = engine.generate(
                internal_params(64, 64, 12, preset, "a red cat"), lambda step, total: None
            )
            images[deferred, preset] = torch.from_numpy(np.array(output.images[0]))
            pending = deferred and preset == "off"
            assert set(kinds) == {"PendingGating" if pending else "Tensor"}, (deferred, preset)
            assert (output.cached_steps > 0) is (preset == "fast")
    for preset in ("off", "fast"):
        assert torch.equal(images[True, preset], images[False, preset]), preset


def test_deferred_gating_is_on_by_default_and_turned_off_by_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).deferred_gating is True
    assert engine_options(parser.parse_args(["--no-deferred-gating"])).deferred_gating is False
    engine = engine_with_cache(monkeypatch, gemm_epilogues=False)
    assert engine.defers_gating is False  # diffusers' single blocks
