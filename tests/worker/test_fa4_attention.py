"""FlashAttention-4 as the fused processor's attention: the op, where it is used, the option.

FA4's kernel itself needs a Hopper GPU (``bench.fa4_check`` measures it there against cuDNN's); on the CPU
the op runs SDPA's math, which these tests hold the wiring to.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import fa4_attention as fa4
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope

from .device_support import compiled_engine_transformer, failing_trial, pretend_hopper_with_packages
from .transformer_support import compiled_error, inputs, tiny_transformer


def token_major(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 24, 2, 16, generator=generator).to(dtype) for _ in range(3)]


def counting_op(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the processor's calls of the op (the op itself still attends)."""
    calls: list[int] = []

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape[2])
        return fa4.fa4_attention(q, k, v)

    monkeypatch.setattr(qk_module, "fa4_attention", counted)
    return calls


def processors(model: Any) -> list[Any]:
    return [
        m.processor
        for m in model.modules()
        if isinstance(getattr(m, "processor", None), FusedQKFluxAttnProcessor)
    ]


def test_the_op_attends_like_sdpa_token_major_in_and_out() -> None:
    q, k, v = token_major(0)
    out = fa4.fa4_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    torch.library.opcheck(fa4.fa4_attention, tuple(token_major(1)))


def test_fa4_takes_half_precision_and_the_head_dims_it_compiles() -> None:
    assert fa4.takes(torch.empty(1, 4, 2, 128, dtype=torch.bfloat16))
    assert fa4.takes(torch.empty(1, 4, 2, 64, dtype=torch.float16))
    assert not fa4.takes(torch.empty(1, 4, 2, 128))  # fp32
    assert not fa4.takes(torch.empty(1, 4, 2, 264, dtype=torch.bfloat16))
    assert not fa4.takes(torch.empty(1, 4, 2, 20, dtype=torch.bfloat16))


def test_fa4_is_used_only_on_a_hopper_gpu_with_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    assert "CUDA GPU" in str(fa4.fa4_unavailable(torch.device("cpu")))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert "not sm_80" in str(fa4.fa4_unavailable(cuda))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(fa4.importlib.util, "find_spec", lambda name: None)
    assert "fluxgate[fa4-attention]" in str(fa4.fa4_unavailable(cuda))
    monkeypatch.setattr(fa4.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(fa4, "trial_call", lambda device: None)
    assert fa4.fa4_unavailable(cuda) is None


def test_an_install_that_fails_its_trial_call_keeps_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_hopper_with_packages(monkeypatch, fa4)
    broken = failing_trial(ImportError("libcute_dsl_runtime.so: cannot open shared object file"))
    monkeypatch.setattr(fa4, "trial_call", broken)
    reason = str(fa4.fa4_unavailable(torch.device("cuda", 0)))
    assert "trial call failed: ImportError: libcute_dsl_runtime.so" in reason


@torch.no_grad()
def test_processors_given_fa4_attend_through_the_op_in_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = torch.bfloat16
    model = tiny_transformer(bf16)
    apply_fused_qk_norm_rope(model)
    expected = model(**inputs(bf16))[0]
    calls = counting_op(monkeypatch)
    assert qk_module.use_fa4_attention(model) == 2 + 3
    assert torch.equal(model(**inputs(bf16))[0], expected)  # the op's CPU math is SDPA's
    assert len(calls) == 2 + 3


@torch.no_grad()
def test_queries_fa4_does_not_take_keep_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_transformer(torch.float32)
    apply_fused_qk_norm_rope(model)
    qk_module.use_fa4_attention(model)
    calls = counting_op(monkeypatch)
    model(**inputs(torch.float32))
    assert calls == []


@torch.no_grad()
def test_a_ulysses_ranks_local_attention_runs_fa4(monkeypatch: pytest.MonkeyPatch) -> None:
    processor = FusedQKFluxAttnProcessor()
    processor.fa4 = True
    calls = counting_op(monkeypatch)
    processor._local_attention()(*token_major(2, torch.bfloat16))
    assert calls == [2]


def test_compiled_blocks_trace_fa4_in_one_graph() -> None:
    def fused_with_fa4(model: Any) -> None:
        apply_fused_qk_norm_rope(model)
        qk_module.use_fa4_attention(model)

    assert compiled_error(fused_with_fa4) < 0.02


def engine_processors(monkeypatch: pytest.MonkeyPatch, **options: Any) -> list[Any]:
    return processors(compiled_engine_transformer(monkeypatch, **options))


def test_the_compiled_engine_attends_through_fa4_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "fa4_unavailable", lambda device: None)
    found = engine_processors(monkeypatch)
    assert found and all(processor.fa4 for processor in found)


@pytest.mark.parametrize(
    "options", [{"fa4_attention": False}, {"attention_backend": "native"}, {"attention_fp8": True}]
)
def test_the_flag_another_backend_or_fp8_attention_keep_fa4_out(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    monkeypatch.setattr(engine_module, "fa4_unavailable", lambda device: None)
    found = engine_processors(monkeypatch, **options)
    assert found and not any(processor.fa4 for processor in found)


def test_the_log_says_why_fa4_does_not_attend(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        found = engine_processors(monkeypatch)
    assert found and not any(processor.fa4 for processor in found)
    assert "attention: SDPA (FlashAttention-4 needs a CUDA GPU)" in caplog.text


def test_fa4_is_on_by_default_and_the_flag_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).fa4_attention is True
    assert engine_options(parser.parse_args(["--compile", "--no-fa4-attention"])).fa4_attention is False
