"""--quack-gelu: the feed-forwards' tanh GELU inside quack's GEMM epilogue (on a Hopper GPU; on the CPU the op
computes diffusers' math with torch, so the wiring is checked here bit for bit)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import quack_gating, quack_gelu
from worker.optimizations.epilogues import EpilogueGELU, EpilogueSingleBlock, apply_gemm_epilogues
from worker.optimizations.quack_gelu import (
    MIN_ROWS,
    QuackGELU,
    QuackGELUSingleBlock,
    apply_quack_gelu,
    quack_gelu_linear,
    takes,
)

from .device_support import compiled_engine_transformer, failing_trial, pretend_hopper_with_packages
from .transformer_support import inputs, relative_rms, tiny_transformer


def test_the_op_is_the_tanh_gelu_of_the_projection() -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((5, 3), (4, 3), (4,)))
    expected = F.gelu(x @ weight.T + bias, approximate="tanh")
    torch.testing.assert_close(quack_gelu_linear(x, weight, bias), expected)


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    torch.library.opcheck(quack_gelu_linear, (torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)))


def test_quack_takes_bf16_image_rows_of_aligned_widths_only() -> None:
    def operands(rows: int, inputs: int = 64, outputs: int = 96, dtype: torch.dtype = torch.bfloat16) -> Any:
        return torch.zeros(rows, inputs, dtype=dtype), torch.zeros(outputs, inputs, dtype=dtype)

    assert takes(*operands(MIN_ROWS))
    assert not takes(*operands(MIN_ROWS - 1))  # the text stream's rows keep cuBLAS's epilogue
    assert not takes(*operands(MIN_ROWS, dtype=torch.float16))
    assert not takes(*operands(MIN_ROWS, inputs=60))  # rows of 120 bytes: not a TMA copy's 16-byte multiple
    assert not takes(*operands(MIN_ROWS, outputs=100))
    x, weight = operands(MIN_ROWS)
    assert not takes(x.t().contiguous().t(), weight)  # a column-major input
    assert not takes(x, weight.t().contiguous().t())


def quack_modules(model: Any) -> list[Any]:
    return [module for module in model.modules() if isinstance(module, (QuackGELU, QuackGELUSingleBlock))]


@torch.no_grad()
def test_quack_gelu_gives_the_epilogue_forwards_output_to_the_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = quack_gelu.quack_gelu_linear

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(quack_gelu, "quack_gelu_linear", counted)
    expected_model = tiny_transformer()
    apply_gemm_epilogues(expected_model)
    expected = expected_model(**inputs(torch.float32))[0]
    model = tiny_transformer()
    apply_gemm_epilogues(model)
    # each double block's two feed-forwards (image, text) and each single block's MLP
    assert apply_quack_gelu(model) == 2 * 2 + 3
    assert len(quack_modules(model)) == 7
    assert torch.equal(model(**inputs(torch.float32))[0], expected)
    assert len(calls) == 7


def test_only_the_epilogue_forwards_take_quack_gelu() -> None:
    model = tiny_transformer()
    assert apply_quack_gelu(model) == 0  # no GEMM epilogues applied: diffusers' classes stay
    assert not any(isinstance(m, (EpilogueGELU, EpilogueSingleBlock)) for m in model.modules())


@torch.no_grad()
def test_quack_gelu_composes_with_the_gating_and_compiles_in_one_graph() -> None:
    # the engine's order: the regional compile finds the blocks by their class names, then the classes change
    # and the compiled blocks trace the new forwards at their first call (fullgraph: a graph break fails)
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    model.compile_repeated_blocks(fullgraph=True)
    apply_gemm_epilogues(model)
    assert quack_gating.apply_quack_gating(model) == 2
    assert apply_quack_gelu(model) == 7
    assert relative_rms(model(**inputs(bf16))[0], expected) < 0.02


def engine_modules(monkeypatch: pytest.MonkeyPatch, **options: Any) -> list[Any]:
    return quack_modules(compiled_engine_transformer(monkeypatch, **options))


def test_the_engine_takes_quack_gelu_unless_told_not_to_where_it_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "quack_gelu_unavailable", lambda device: None)
    assert engine_modules(monkeypatch, quack_gelu=False) == []
    assert len(engine_modules(monkeypatch)) > 0  # the default


def test_without_the_gemm_epilogues_the_log_says_quack_gelu_has_nothing_to_replace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine_module, "quack_gelu_unavailable", lambda device: None)
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        assert engine_modules(monkeypatch, gemm_epilogues=False) == []
    assert "quack GELU epilogue: off (it takes the place of the GEMM epilogues' GELU" in caplog.text


def test_the_log_says_why_quack_gelu_is_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        assert engine_modules(monkeypatch, quack_gelu=True) == []
    assert "quack GELU epilogue: off (quack's GEMMs need a CUDA GPU)" in caplog.text


def test_an_install_that_fails_its_trial_call_keeps_cublas_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_hopper_with_packages(monkeypatch, quack_gating)
    monkeypatch.setattr(quack_gating, "trial_call", lambda device: None)
    monkeypatch.setattr(quack_gelu, "trial_call", failing_trial(RuntimeError("DSL compile failed")))
    reason = quack_gelu.quack_gelu_unavailable(torch.device("cuda", 0))
    assert reason == "quack's GELU epilogue's trial call failed: RuntimeError: DSL compile failed"
    monkeypatch.setattr(quack_gelu, "trial_call", lambda device: None)
    assert quack_gelu.quack_gelu_unavailable(torch.device("cuda", 0)) is None


def test_quack_gelu_is_on_by_default_and_a_flag_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).quack_gelu is True
    assert engine_options(parser.parse_args(["--compile", "--quack-gelu"])).quack_gelu is True
    assert engine_options(parser.parse_args(["--compile", "--no-quack-gelu"])).quack_gelu is False
