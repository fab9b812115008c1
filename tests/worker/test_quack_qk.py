"""--quack-qk: the attention's query and key projected, normed and rotated inside their GEMMs (quack's
epilogue on a Hopper GPU; on the CPU the op runs the fused processor's math, so the wiring is checked here bit
for bit)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import quack_qk
from worker.optimizations.epilogues import apply_gemm_epilogues
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.optimizations.quack_qk import QuackQKFluxAttnProcessor, apply_quack_qk, projected_qk, rope_table
from worker.tiny_model import build_tiny_pipeline

from .device_support import compiled_engine_transformer, failing_trial, pretend_hopper_with_packages
from .transformer_support import inputs, relative_rms, tiny_transformer

TINY_HEAD_DIM = 16  # tiny_transformer's


@pytest.fixture
def tiny_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The epilogue's head width set to the tiny transformer's (the GPU's is FLUX.1's 128)."""
    monkeypatch.setattr(quack_qk, "HEAD_DIM", TINY_HEAD_DIM)


def quack_processors(model: Any) -> list[Any]:
    return [
        module.processor
        for module in model.modules()
        if isinstance(getattr(module, "processor", None), QuackQKFluxAttnProcessor)
    ]


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each ``projected_qk`` call's text rows, the op still run."""
    calls: list[int] = []
    real = quack_qk.projected_qk

    def counted(*args: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(quack_qk, "projected_qk", counted)
    return calls


def test_the_rope_table_holds_each_pairs_cos_then_sin() -> None:
    angles = torch.randn(5, 3)
    cos, sin = angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)
    table = rope_table(cos, sin)
    assert torch.equal(table[:, 0::2], angles.cos()) and torch.equal(table[:, 1::2], angles.sin())


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    angles = draw(7, 4)
    cos, sin = angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)
    text_norm, image_norm = draw(8).repeat(2), draw(8).repeat(2)  # two heads of eight
    arguments = (draw(3, 6), draw(16, 6), draw(16), text_norm, draw(4, 6), draw(16, 6), draw(16), image_norm)
    torch.library.opcheck(projected_qk, (*arguments, rope_table(cos, sin), 8))
    assert projected_qk(*arguments, rope_table(cos, sin), 8).shape == (7, 16)


def test_the_norms_repeated_per_head_stay_out_of_the_state_dict() -> None:
    model = tiny_transformer()
    keys = set(model.state_dict())
    apply_fused_qk_norm_rope(model)
    apply_quack_qk(model)
    assert set(model.state_dict()) == keys
    attention = model.transformer_blocks[0].attn
    assert torch.equal(attention.quack_norm_added_k, attention.norm_added_k.weight.repeat(2))


@torch.no_grad()
def test_the_epilogue_processor_gives_the_fused_processors_output_to_the_bit(
    monkeypatch: pytest.MonkeyPatch, tiny_heads: None
) -> None:
    calls = counting(monkeypatch)
    fused = tiny_transformer()
    apply_fused_qk_norm_rope(fused)
    expected = fused(**inputs(torch.float32))[0]
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    assert apply_quack_qk(model) == 5  # two double blocks' attention, three single blocks'
    assert torch.equal(model(**inputs(torch.float32))[0], expected)
    # a query and a key per attention; the double blocks' with their text tokens
    assert sorted(calls) == [0] * 6 + [7] * 4


@torch.no_grad()
def test_a_batch_of_several_jobs_keeps_the_fused_processors_projections(
    monkeypatch: pytest.MonkeyPatch, tiny_heads: None
) -> None:
    monkeypatch.setattr(
        quack_qk, "projected_qk", lambda *args: pytest.fail("projected a batch in the epilogue")
    )
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    apply_quack_qk(model)
    batch = inputs(torch.float32)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        batch[name] = batch[name].repeat(2, *([1] * (batch[name].dim() - 1)))
    model(**batch)


@torch.no_grad()
def test_another_head_width_keeps_the_fused_processors_projections(monkeypatch: pytest.MonkeyPatch) -> None:
    # quack's epilogue was measured at FLUX.1's 128-wide heads; the tiny transformer's are 16 wide
    monkeypatch.setattr(quack_qk, "projected_qk", lambda *args: pytest.fail("projected in the epilogue"))
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    assert apply_quack_qk(model) == 5
    model(**inputs(torch.float32))


def test_hooked_projections_keep_the_fused_processors_path(
    monkeypatch: pytest.MonkeyPatch, tiny_heads: None
) -> None:
    calls = counting(monkeypatch)
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    apply_quack_qk(model)
    attention = model.single_transformer_blocks[0].attn
    attention.to_q.register_forward_hook(lambda *args: None)  # a streamed or adapted layer
    with torch.no_grad():
        model(**inputs(torch.float32))
    assert len(calls) == 8  # the other four attentions


@torch.no_grad()
def test_the_epilogue_processor_composes_with_the_gemm_epilogues_and_compiles_in_one_graph(
    tiny_heads: None,
) -> None:
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    apply_fused_qk_norm_rope(model)
    model.compile_repeated_blocks(fullgraph=True)
    apply_gemm_epilogues(model)
    assert apply_quack_qk(model) == 5
    assert relative_rms(model(**inputs(bf16))[0], expected) < 0.02


def test_only_fused_processors_on_one_gpu_change() -> None:
    model = tiny_transformer()
    assert apply_quack_qk(model) == 0  # diffusers' own processors
    apply_fused_qk_norm_rope(model)
    model.single_transformer_blocks[0].attn.processor._parallel_config = object()  # a sequence layout's
    assert apply_quack_qk(model) == 4
    assert type(model.single_transformer_blocks[0].attn.processor) is FusedQKFluxAttnProcessor


def engine_processors(monkeypatch: pytest.MonkeyPatch, **options: Any) -> list[Any]:
    return quack_processors(compiled_engine_transformer(monkeypatch, **options))


def test_the_engine_uses_the_epilogue_only_when_asked_and_it_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "quack_qk_unavailable", lambda device: None)
    assert engine_processors(monkeypatch) == []  # opt-in
    processors = engine_processors(monkeypatch, quack_qk=True)
    assert processors and all(processor.fa4 is False for processor in processors)


def test_the_log_says_why_the_epilogue_is_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        assert engine_processors(monkeypatch, quack_qk=True) == []
    assert "quack query/key epilogue: off (quack's GEMMs need a CUDA GPU)" in caplog.text
    pipe = build_tiny_pipeline("flux1", seed=0)
    apply_fused_qk_norm_rope(pipe.transformer)
    monkeypatch.setattr(engine_module, "quack_qk_unavailable", lambda device: None)
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        engine_module.set_quack_qk(pipe, False, torch.device("cpu"))
    assert quack_processors(pipe.transformer) == []
    assert (
        "quack query/key epilogue: off (it runs on one GPU with a resident, unsharded transformer)"
        in caplog.text
    )


def test_the_epilogue_needs_quack_and_a_trial_that_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.optimizations import quack_gating

    assert quack_qk.quack_qk_unavailable(torch.device("cpu")) == "quack's GEMMs need a CUDA GPU"
    pretend_hopper_with_packages(monkeypatch, quack_gating)
    monkeypatch.setattr(quack_gating, "trial_call", lambda device: None)
    monkeypatch.setattr(quack_qk, "trial_call", failing_trial(RuntimeError("epilogue does not fit")))
    reason = quack_qk.quack_qk_unavailable(torch.device("cuda", 0))
    assert reason == "quack's query/key epilogue's trial call failed: RuntimeError: epilogue does not fit"
    monkeypatch.setattr(quack_qk, "trial_call", lambda device: None)
    assert quack_qk.quack_qk_unavailable(torch.device("cuda", 0)) is None


def test_the_epilogue_is_off_by_default_and_the_flag_turns_it_on() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).quack_qk is False
    assert engine_options(parser.parse_args(["--compile", "--quack-qk"])).quack_qk is True
