"""The double blocks' image-stream q/k/v projection through quack's GEMM (``quack_projection``): on a Hopper
GPU quack's kernel; here the op's cuBLAS/CPU path, so the wiring is checked bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.optimizations import fused_qkv as fused_module
from worker.optimizations.joint_value import linear_into
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.optimizations.quack_projection import quack_linear_into

from .test_fused_qkv import fused_model
from .transformer_support import inputs, tiny_transformer


def test_the_op_writes_the_rows_linear_into_writes() -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 5, 3), (4, 3), (4,)))
    expected, got = (torch.zeros(2, 8, 4) for _ in range(2))
    linear_into(expected[:, 3:], x, weight, bias)
    quack_linear_into(got[:, 3:], x, weight, bias)
    assert torch.equal(got, expected)
    assert not got[:, :3].any()  # the other rows (the text stream's) untouched


def test_the_op_schema_and_fake_tensor_agree() -> None:
    arguments = (torch.zeros(2, 5, 4), torch.randn(2, 5, 3), torch.randn(4, 3), torch.randn(4))
    torch.library.opcheck(quack_linear_into, arguments)


@torch.no_grad()
def test_processors_projecting_through_quack_give_the_fused_output(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = fused_model()(**inputs(torch.float32))[0]
    calls: list[Any] = []
    real = fused_module.quack_linear_into
    monkeypatch.setattr(fused_module, "quack_linear_into", lambda *a: calls.append(1) or real(*a))
    model = fused_model()
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), FusedQKFluxAttnProcessor):
            module.processor.quack_projection = True
    assert torch.equal(model(**inputs(torch.float32))[0], expected)
    assert len(calls) == 2  # the double blocks' image streams; the single blocks keep cuBLAS


def test_the_processors_project_with_cublas_unless_told() -> None:
    model = tiny_transformer()
    apply_fused_qk_norm_rope(model)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and not any(p.quack_projection for p in processors)
