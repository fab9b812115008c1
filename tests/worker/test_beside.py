"""The attention beside a single block's MLP GEMM: the same outputs, compiled as one op, only where it can."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations import ulysses as ulysses_module
from worker.optimizations.beside import attend_named, attention_beside_gelu_linear
from worker.optimizations.epilogues import EpilogueSingleBlock, apply_gemm_epilogues
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.optimizations.symmetric_exchange import attention_back_beside
from worker.optimizations.ulysses import PendingAttention

from .transformer_support import inputs, relative_rms, tiny_transformer


def beside_model(dtype: torch.dtype = torch.float32) -> Any:
    model = tiny_transformer(dtype)
    apply_fused_qk_norm_rope(model)
    apply_gemm_epilogues(model)
    return model


@pytest.fixture
def beside_everywhere(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Streams taken as available on the CPU (the op then runs its two parts one after the other); the
    list counts the op's calls."""
    calls: list[int] = []
    op = ulysses_module.attention_beside_gelu_linear

    def counted(*args: Any) -> Any:
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(qk_module, "beside_applies", lambda tensor: True)
    monkeypatch.setattr(ulysses_module, "attention_beside_gelu_linear", counted)
    return calls


def test_the_op_gives_the_attention_and_the_gelu_projection() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=generator) for _ in range(3))
    hidden, weight, bias = torch.randn(6, 16), torch.randn(32, 16), torch.randn(32)
    args = (q, k, v, hidden, weight, bias, "")
    torch.library.opcheck(attention_beside_gelu_linear, args)
    out, projected = attention_beside_gelu_linear(*args)
    assert torch.equal(out, attend_named(q, k, v, ""))
    assert out.shape == (1, 6, 2, 8) and out.is_contiguous()
    assert torch.equal(projected, F.gelu(F.linear(hidden, weight, bias), approximate="tanh"))


def test_the_symmetric_attention_back_beside_a_gemm_gives_the_result_and_the_gemm_shapes() -> None:
    with FakeTensorMode():
        received = torch.empty(3, 1, 18, 12, 128, dtype=torch.bfloat16)
        mlp = torch.empty(9, 12288, dtype=torch.bfloat16)
        weight = torch.empty(12288, 3072, dtype=torch.bfloat16)
        result, product = attention_back_beside(received, mlp, weight, "", "group", 2)
        assert result.shape == (1, 9, 2, 12, 128) and product.shape == (9, 3072)


@torch.no_grad()
def test_one_gpu_single_blocks_run_their_attention_beside_proj_mlp(beside_everywhere: list[int]) -> None:
    expected = tiny_transformer()(**inputs(torch.float32))[0]
    assert relative_rms(beside_model()(**inputs(torch.float32))[0], expected) < 1e-5
    assert len(beside_everywhere) == 3  # each single block once; the double blocks have nothing beside


@torch.no_grad()
def test_without_attention_beside_the_single_blocks_attend_in_place(
    beside_everywhere: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FusedQKFluxAttnProcessor, "attention_beside", False)
    beside_model()(**inputs(torch.float32))
    assert beside_everywhere == []


@torch.no_grad()
def test_cpu_tensors_attend_in_place() -> None:
    model = beside_model()
    block = model.single_transformer_blocks[0]
    assert isinstance(block, EpilogueSingleBlock)
    processor = block.attn.processor
    assert not processor._pends(torch.empty(1, 4, 32))  # no streams off CUDA


@torch.no_grad()
def test_the_pending_attention_names_the_processors_backend(beside_everywhere: list[int]) -> None:
    model = tiny_transformer()
    model.set_attention_backend("native")
    apply_fused_qk_norm_rope(model)
    apply_gemm_epilogues(model)
    seen: list[str] = []
    settle = PendingAttention.settle_beside

    def spy(self: PendingAttention, mat1: torch.Tensor, mat2: torch.Tensor) -> Any:
        seen.append(self.backend)
        return settle(self, mat1, mat2)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PendingAttention, "settle_beside", spy)
        model(**inputs(torch.float32))
    assert seen == ["native"] * 3


@torch.no_grad()
def test_compiled_single_blocks_call_the_op_in_their_graph(beside_everywhere: list[int]) -> None:
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = beside_model(bf16)
    model.compile_repeated_blocks(fullgraph=True)
    assert relative_rms(model(**inputs(bf16))[0], expected) < 0.02
    assert beside_everywhere  # traced into the compiled blocks, then run as part of their graphs
