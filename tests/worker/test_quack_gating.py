"""--quack-gating: the double blocks' feed-forward gated inside its output GEMM (quack's epilogue on a Hopper
GPU; on the CPU the op computes the same sum with torch, so the wiring is checked here bit for bit)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import quack_gating
from worker.optimizations.epilogues import apply_gemm_epilogues
from worker.optimizations.quack_gating import GatedFeedForwardBlock, apply_quack_gating, gated_linear
from worker.tiny_model import build_tiny_pipeline

from .device_support import compiled_engine_transformer, failing_trial, pretend_hopper_with_packages
from .transformer_support import inputs, relative_rms, tiny_transformer


def test_the_op_adds_the_gated_projection_to_the_residual() -> None:
    generator = torch.Generator().manual_seed(0)
    residual, x = torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator)
    weight, bias, gate = (torch.randn(*shape, generator=generator) for shape in ((4, 3), (4,), (4,)))
    expected = residual + gate * (x @ weight.T + bias)
    torch.testing.assert_close(gated_linear(residual, x, weight, bias, gate), expected)


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    arguments = (torch.randn(5, 4), torch.randn(5, 3), torch.randn(4, 3), torch.randn(4), torch.randn(4))
    torch.library.opcheck(gated_linear, arguments)


def gated_blocks(model: Any) -> list[Any]:
    return [block for block in model.modules() if isinstance(block, GatedFeedForwardBlock)]


@torch.no_grad()
def test_gated_double_blocks_give_diffusers_output_to_the_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = quack_gating.gated_linear

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(quack_gating, "gated_linear", counted)
    expected = tiny_transformer()(**inputs(torch.float32))[0]
    model = tiny_transformer()
    assert apply_quack_gating(model) == 2  # the double blocks; the single blocks keep their class
    assert len(gated_blocks(model)) == 2
    assert torch.equal(model(**inputs(torch.float32))[0], expected)
    assert len(calls) == 2


@torch.no_grad()
def test_a_batch_of_several_jobs_keeps_diffusers_gating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quack_gating, "gated_linear", lambda *args: pytest.fail("gated a batch"))
    block = FluxTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16).eval()
    torch.manual_seed(1)
    hidden, text, temb = torch.randn(2, 9, 32), torch.randn(2, 3, 32), torch.randn(2, 32)
    expected = block(hidden, text, temb)
    apply_quack_gating(block)
    assert type(block) is GatedFeedForwardBlock
    for got, want in zip(block(hidden, text, temb), expected, strict=True):
        assert torch.equal(got, want)


def test_blocks_whose_output_layer_is_not_a_plain_linear_keep_their_forward() -> None:
    model = tiny_transformer()
    block = model.transformer_blocks[0]
    block.ff.net[2].register_forward_hook(lambda *args: None)  # a hooked layer (streamed offload, an adapter)
    assert apply_quack_gating(model) == 1
    assert type(block) is FluxTransformerBlock


@torch.no_grad()
def test_gating_composes_with_the_gelu_epilogues_and_compiles_in_one_graph() -> None:
    # the engine's order: the regional compile finds the blocks by their class names, then the classes change
    # and the compiled blocks trace the new forwards at their first call (fullgraph: a graph break fails)
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    model.compile_repeated_blocks(fullgraph=True)
    apply_gemm_epilogues(model)
    assert apply_quack_gating(model) == 2
    assert relative_rms(model(**inputs(bf16))[0], expected) < 0.02


def engine_blocks(monkeypatch: pytest.MonkeyPatch, **options: Any) -> tuple[list[Any], int]:
    """The engine's gated double blocks, and how many double blocks the tiny transformer has."""
    transformer = compiled_engine_transformer(monkeypatch, **options)
    return gated_blocks(transformer), len(transformer.transformer_blocks)


def test_the_engine_gates_with_quack_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "quack_unavailable", lambda device: None)
    assert engine_blocks(monkeypatch, quack_gating=False)[0] == []
    gated, double_blocks = engine_blocks(monkeypatch)  # the default
    assert double_blocks > 0 and len(gated) == double_blocks


def test_the_log_says_why_quack_does_not_gate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        assert engine_blocks(monkeypatch, quack_gating=True)[0] == []
    assert "quack gating: off (quack's GEMMs need a CUDA GPU)" in caplog.text


def test_a_sequence_parallel_layout_keeps_diffusers_gating(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine_module, "quack_unavailable", lambda device: None)
    pipe = build_tiny_pipeline("flux1", seed=0)
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        engine_module.set_quack_gating(pipe, False, torch.device("cpu"))
    assert gated_blocks(pipe.transformer) == []
    assert "runs on one GPU with a resident, unsharded transformer" in caplog.text


def test_quack_needs_a_hopper_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert quack_gating.quack_unavailable(torch.device("cpu")) == "quack's GEMMs need a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (10, 0))
    reason = quack_gating.quack_unavailable(torch.device("cuda", 0))
    assert reason is not None and "sm_100" in reason


def test_an_install_that_fails_its_trial_call_keeps_diffusers_gating(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_hopper_with_packages(monkeypatch, quack_gating)
    monkeypatch.setattr(
        quack_gating, "trial_call", failing_trial(RuntimeError("no kernel image for this device"))
    )
    reason = quack_gating.quack_unavailable(torch.device("cuda", 0))
    assert reason == "quack's trial call failed: RuntimeError: no kernel image for this device"
    monkeypatch.setattr(quack_gating, "trial_call", lambda device: None)
    assert quack_gating.quack_unavailable(torch.device("cuda", 0)) is None


def test_quack_gating_is_on_by_default_and_a_flag_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).quack_gating is True
    assert engine_options(parser.parse_args(["--compile", "--quack-gating"])).quack_gating is True
    assert engine_options(parser.parse_args(["--compile", "--no-quack-gating"])).quack_gating is False
