"""The joint attention value written in place by its two projections: the concatenation's values, no copy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.epilogues import plain_linear
from worker.optimizations.joint_value import joint_value
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope

from .transformer_support import inputs, tiny_transformer


def projections() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    return torch.nn.Linear(32, 48), torch.nn.Linear(32, 48)


@pytest.mark.parametrize("batch", [1, 3])
def test_joint_value_is_the_concatenation_of_both_projections(batch: int) -> None:
    text_linear, image_linear = projections()
    text, image = torch.randn(batch, 5, 32), torch.randn(batch, 9, 32)
    with torch.inference_mode():
        expected = torch.cat([text_linear(text), image_linear(image)], dim=1)
        torch.testing.assert_close(joint_value(text, image, text_linear, image_linear), expected)


def test_compiled_projections_write_their_rows_of_one_buffer_without_a_copy() -> None:
    text_linear, image_linear = projections()
    text, image = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    compiled = torch.compile(lambda t, i: joint_value(t, i, text_linear, image_linear) * 2)
    with torch.inference_mode():
        output, (code, *_) = run_and_get_code(compiled, text, image)
        torch.testing.assert_close(output, torch.cat([text_linear(text), image_linear(image)], dim=1) * 2)
    writes = [line for line in code.splitlines() if "fluxgate.linear_into.default(" in line]
    assert len(writes) == 2 and all("reinterpret_tensor(buf0" in line for line in writes)
    assert (
        "cat" not in code.split("def call")[1].split("return")[0].replace("# ", "").split("Original ATen")[0]
    )


def test_only_plain_biased_linears_write_in_place() -> None:
    linear = torch.nn.Linear(4, 4)
    assert plain_linear(linear)
    assert not plain_linear(torch.nn.Linear(4, 4, bias=False))
    linear.register_forward_hook(lambda *args: None)
    assert not plain_linear(linear)


@torch.no_grad()
def test_the_processor_with_the_joint_value_gives_the_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(qk_module, "joint_value", lambda *args: calls.append(1) or joint_value(*args))
    expected_model = tiny_transformer(torch.float32)
    apply_fused_qk_norm_rope(expected_model)
    expected = expected_model(**inputs(torch.float32))[0]
    model = tiny_transformer(torch.float32)
    apply_fused_qk_norm_rope(model)
    processors: list[Any] = [m.processor for m in model.modules() if hasattr(m, "processor")]
    for processor in processors:
        assert isinstance(processor, FusedQKFluxAttnProcessor)
        processor.joint_value = True
    torch.testing.assert_close(model(**inputs(torch.float32))[0], expected)
    assert len(calls) == 2  # the two double blocks; the single blocks have no text stream of their own
