"""The MLPs' GELU in the GEMMs' epilogues: same model, same outputs, applied only where it is safe."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.models.activations import GELU
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch._inductor.utils import run_and_get_code

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit
from worker.optimizations.epilogues import (
    EpilogueGELU,
    EpilogueSingleBlock,
    apply_gemm_epilogues,
    split_projection,
)
from worker.optimizations.quantize import Fp8Config, apply_fp8, float8_on_cpu
from worker.optimizations.ulysses import PendingAttention
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

from .transformer_support import inputs, relative_rms, tiny_transformer

CPU = torch.device("cpu")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
@torch.no_grad()
def test_epilogue_forwards_give_diffusers_output(dtype: torch.dtype, tolerance: float) -> None:
    expected = tiny_transformer(dtype)(**inputs(dtype))[0]
    model = tiny_transformer(dtype)
    apply_gemm_epilogues(model)
    assert relative_rms(model(**inputs(dtype))[0], expected) < tolerance


def test_every_feed_forward_gelu_and_single_block_changes_class_and_keeps_its_weights() -> None:
    model = tiny_transformer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # two feed-forwards (image, text) per double block, and every single block
    assert apply_gemm_epilogues(model) == 2 * 2 + 3
    assert sum(isinstance(module, EpilogueGELU) for module in model.modules()) == 4
    assert sum(isinstance(module, EpilogueSingleBlock) for module in model.modules()) == 3
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert apply_gemm_epilogues(model) == 0  # already applied


def test_hooked_linears_and_exact_gelus_keep_diffusers_forward() -> None:
    model = tiny_transformer()
    hooked_block = model.single_transformer_blocks[0]
    hooked_block.proj_out.register_forward_pre_hook(lambda module, args: None)
    streamed = model.transformer_blocks[0].ff.net[0]
    streamed.proj.forward = streamed.proj.forward  # an instance forward, as offload hooks install
    exact = model.transformer_blocks[1].ff_context.net[0]
    exact.approximate = "none"
    assert apply_gemm_epilogues(model) == 7 - 3
    assert type(hooked_block) is FluxSingleTransformerBlock
    assert type(streamed) is GELU and type(exact) is GELU


class PendingExchange:
    """What cache-dit's async Ulysses returns from a single block's attention: the output, later."""

    def __init__(self, output: torch.Tensor, heads: int) -> None:
        self.output = output.unflatten(-1, (heads, -1))
        self.waited = False

    def wait(self) -> torch.Tensor:
        self.waited = True
        return self.output


@torch.no_grad()
def test_single_block_waits_for_a_pending_attention_exchange() -> None:
    model = tiny_transformer()
    expected = model(**inputs(torch.float32))[0]
    apply_gemm_epilogues(model)
    attention = model.single_transformer_blocks[1].attn
    exact_forward = attention.forward
    pending: list[PendingExchange] = []

    def exchanged(**kwargs: Any) -> PendingExchange:
        pending.append(PendingExchange(exact_forward(**kwargs), attention.heads))
        return pending[-1]

    attention.forward = exchanged
    assert relative_rms(model(**inputs(torch.float32))[0], expected) < 1e-5
    assert [exchange.waited for exchange in pending] == [True]


class RecordedPending(PendingAttention):
    """A pending attention that records the order of its steps (no exchange: the attention is given)."""

    def __init__(self, output: torch.Tensor, order: list[str]) -> None:
        super().__init__(output, output, output, None, lambda q, k, v: q, symmetric=False)
        self.output, self.order = output, order

    def attend_beside(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        self.order.append("in, beside the MLP's projection")
        self.out = self.output
        return torch.nn.functional.gelu(torch.nn.functional.linear(hidden, weight, bias), approximate="tanh")

    def settle_beside(self, mat1: torch.Tensor, mat2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.order.append("back, beside proj_out's MLP part")
        return torch.mm(mat1, mat2), self.output


@torch.no_grad()
def test_single_block_runs_a_pending_attentions_exchanges_beside_its_mlp_gemms() -> None:
    model = tiny_transformer()
    expected = model(**inputs(torch.float32))[0]
    apply_gemm_epilogues(model)
    block = model.single_transformer_blocks[1]
    exact_forward = block.attn.forward
    order: list[str] = []

    def later(**kwargs: Any) -> PendingAttention:
        order.append("projections")
        return RecordedPending(exact_forward(**kwargs), order)

    block.attn.forward = later
    assert relative_rms(model(**inputs(torch.float32))[0], expected) < 1e-5
    assert order == ["projections", "in, beside the MLP's projection", "back, beside proj_out's MLP part"]


def compiled_epilogue_blocks(pipe: Any) -> int:
    blocks = pipe.transformer.single_transformer_blocks
    compiled = [block for block in blocks if block._compiled_call_impl is not None]
    return sum(isinstance(block, EpilogueSingleBlock) for block in compiled)


@pytest.mark.parametrize(
    ("options", "applied"),
    [
        ({"compile": True}, True),
        ({}, False),  # measured with the compiled blocks only
        ({"compile": True, "gemm_epilogues": False}, False),
        ({"compile": True, "dit_cpu_offload": True}, False),  # streamed blocks keep their hooks' forward
    ],
)
def test_engine_applies_epilogues_when_it_compiles_a_resident_transformer(
    options: dict[str, Any], applied: bool
) -> None:
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(**options), CPU)
    # the regional compile still finds the single blocks (by class name) and wraps them, lazily
    blocks = len(pipe.transformer.single_transformer_blocks)
    assert compiled_epilogue_blocks(pipe) == (blocks if applied else 0)


def test_no_gemm_epilogues_flag_turns_them_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).gemm_epilogues is True
    assert engine_options(parser.parse_args(["--no-gemm-epilogues"])).gemm_epilogues is False


def test_fp8_layers_keep_diffusers_forward() -> None:
    # under --quantize fp8 every MLP projection is a torchao tensor: nothing to fuse with cuBLASLt
    pipe = SimpleNamespace(transformer=tiny_transformer(torch.bfloat16))
    with float8_on_cpu():
        apply_fp8(pipe, Fp8Config(), CPU)
    assert type(pipe.transformer.single_transformer_blocks[0].proj_mlp.weight).__name__ == "Float8Tensor"
    assert apply_gemm_epilogues(pipe.transformer) == 0


def test_cache_dit_presets_cache_the_same_steps_on_epilogue_blocks() -> None:
    # the engine installs Cache-DiT at load and swaps the classes afterwards, as here
    presets = {"fast": CacheDitConfig(enabled=True, scm_preset="fast", scm_policy="static")}
    images = []
    for epilogues in (False, True):
        pipe = build_tiny_pipeline("flux1", seed=0)
        controller = apply_cache_dit(pipe, presets)
        if epilogues:
            assert apply_gemm_epilogues(pipe.transformer) > 0
        controller.prepare("fast", 12, true_cfg=False)
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.inference_mode():
            size = {"width": 64, "height": 64}
            output = pipe("a red cat", **size, num_inference_steps=12, generator=generator, output_type="pt")
        assert controller.cached_steps() == presets["fast"].steps_mask(12).count(0) > 0  # type: ignore[union-attr]
        images.append(output.images)
    assert relative_rms(images[1], images[0]) < 1e-4


class Adapter(torch.nn.Module):
    """A layer wrapping a linear, as an adapter library swaps one in: its own output must be used."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states) + 1.0


@torch.no_grad()
def test_layers_swapped_in_after_the_epilogues_are_called_as_they_are() -> None:
    expected_model, model = tiny_transformer(), tiny_transformer()
    apply_gemm_epilogues(model)
    for each in (expected_model, model):
        block, feed_forward = each.single_transformer_blocks[0], each.transformer_blocks[0].ff.net[0]
        block.proj_out, block.proj_mlp = Adapter(block.proj_out), Adapter(block.proj_mlp)
        feed_forward.proj = Adapter(feed_forward.proj)
    expected = expected_model(**inputs(torch.float32))[0]
    assert relative_rms(model(**inputs(torch.float32))[0], expected) < 1e-5


def test_accumulated_projection_gives_the_split_one() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(16 + 64, 16)
    attention, mlp = torch.randn(2, 5, 16), torch.randn(2, 5, 64)
    with torch.inference_mode():
        split = split_projection(linear, attention, mlp)
        accumulated = split_projection(linear, attention, mlp, accumulate=True)
        expected = linear(torch.cat([attention, mlp], dim=-1))
    assert accumulated.shape == expected.shape
    torch.testing.assert_close(accumulated, expected)
    torch.testing.assert_close(accumulated, split)


def test_compiled_accumulation_adds_into_the_first_gemms_output_without_a_copy() -> None:
    linear = torch.nn.Linear(16 + 64, 16)
    attention, mlp = torch.randn(1, 8, 16), torch.randn(1, 8, 64)
    compiled = torch.compile(lambda a, m: split_projection(linear, a, m, accumulate=True))
    with torch.inference_mode():
        output, (code, *_) = run_and_get_code(compiled, attention, mlp)
        torch.testing.assert_close(output, linear(torch.cat([attention, mlp], dim=-1)))
    call = next(line for line in code.splitlines() if "fluxgate.accumulate_mm" in line and "(" in line)
    mm_output = next(line for line in code.splitlines() if "extern_kernels.mm(" in line).split("out=")[1]
    assert call.strip().startswith("torch.ops.fluxgate.accumulate_mm.default(" + mm_output.rstrip(")"))
    assert "clone" not in code
