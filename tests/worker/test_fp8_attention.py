"""fp8 attention (``--attention-fp8``): the scales, the op's math and schema, the processor, the option.

cuDNN's kernel itself needs a Hopper GPU (``bench.fp8_attention_check`` measures it there); on the CPU the
op runs the same math in fp32, which these tests hold the wiring to.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import fp8_attention as fa
from worker.optimizations import fp8_attention_cudnn
from worker.optimizations.fp8_attention_processor import (
    Fp8FluxAttnProcessor,
    apply_fp8_attention,
    e4m3_project,
    weight_bound_scale,
)
from worker.optimizations.qk_norm_rope import qk_norm_rope
from worker.optimizations.quantize import Fp8Config, apply_fp8, float8_on_cpu
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

from .transformer_support import inputs, relative_rms, tiny_transformer

E4M3_STEP = 2**-3  # e4m3's relative spacing: 3 mantissa bits


def attention_inputs(seed: int, tokens: int = 40, heads: int = 2, head_dim: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, heads, head_dim, generator=generator) * 3 for _ in range(3)]


def test_per_tensor_quantization_maps_the_maximum_to_448_and_keeps_e4m3_precision() -> None:
    x = attention_inputs(0)[0]
    quantized, descale = fa.quantize_per_tensor(x)
    assert quantized.dtype == torch.float8_e4m3fn and descale.shape == (1,)
    assert quantized.float().abs().max() == fa.E4M3_MAX
    restored = quantized.float() * descale
    large = x.abs() > x.abs().max() / 64  # inside e4m3's normal range after scaling
    assert ((restored - x).abs()[large] <= x.abs()[large] * E4M3_STEP / 2 + 1e-6).all()


def test_the_op_attends_like_fp32_attention_within_fp8_rounding() -> None:
    q, k, v = attention_inputs(1)
    (q8, dq), (k8, dk), (v8, dv) = (fa.quantize_per_tensor(t) for t in (q, k, v))
    out = fa.sdpa_fp8(q8, k8, v8, dq, dk, dv, fa.default_scale(16))
    truth = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert out.dtype == torch.float8_e4m3fn and out.shape == q.shape
    assert relative_rms(out.float() * dv, truth.transpose(1, 2)) < 0.1


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    q, k, v = attention_inputs(2)
    (q8, dq), (k8, dk), (v8, dv) = (fa.quantize_per_tensor(t) for t in (q, k, v))
    # opcheck's schema test compares outputs with arithmetic e4m3 lacks on the CPU
    torch.library.opcheck(fa.sdpa_fp8, (q8, k8, v8, dq, dk, dv, 0.25), test_utils="test_faketensor")


def test_the_bf16_fallback_gives_the_ops_result_where_cudnn_has_no_plan() -> None:
    q, k, v = attention_inputs(3)
    (q8, dq), (k8, dk), (v8, dv) = (fa.quantize_per_tensor(t) for t in (q, k, v))
    fallback = fa.reference(q8, k8, v8, dq, dk, dv, 0.25, torch.bfloat16)
    expected = fa.reference(q8, k8, v8, dq, dk, dv, 0.25)
    assert fallback.dtype == torch.float8_e4m3fn
    assert relative_rms(fallback.float(), expected.float()) < 0.05


def test_cudnn_reads_token_major_tensors_as_batch_heads_tokens_head_dim() -> None:
    head_major = torch.empty(2, 3, 5, 8).transpose(1, 2)  # (batch, tokens, heads, head_dim), heads outer
    assert fp8_attention_cudnn.bhsd(head_major) == ((2, 3, 5, 8), (120, 40, 8, 1))
    assert fp8_attention_cudnn.bhsd(torch.empty(2, 5, 3, 8)) == ((2, 3, 5, 8), (120, 8, 24, 1))


def test_the_fused_kernels_fp8_output_is_its_bf16_output_scaled_and_rounded() -> None:
    generator = torch.Generator().manual_seed(4)
    text, image = (torch.randn(1, n, 32, generator=generator).bfloat16() for n in (3, 5))
    cos, sin = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    args = (text, torch.randn(16).bfloat16(), image, torch.randn(16).bfloat16(), cos, sin, 1e-6, 16)
    scale = torch.tensor([7.0])
    quantized = qk_norm_rope(*args, scale)
    expected = (qk_norm_rope(*args).float() * 7.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.stride() == expected.stride()
    assert torch.equal(quantized.float(), expected.float())
    torch.library.opcheck(qk_norm_rope, (*args, scale), test_utils="test_faketensor")


@torch.no_grad()
def test_the_weight_bound_keeps_every_normed_rotated_element_inside_e4m3() -> None:
    model = tiny_transformer(torch.bfloat16)
    attn = model.transformer_blocks[0].attn
    scale, descale = weight_bound_scale(attn, "q", joint=True)
    assert torch.allclose(scale * descale, torch.ones(1))
    generator = torch.Generator().manual_seed(5)
    spiky = torch.randn(1, 9, 32, generator=generator) * torch.tensor([1000.0] + [0.001] * 31)
    text, image = spiky[:, :4].bfloat16(), spiky[:, 4:].bfloat16()
    angles = torch.rand(9, 16, generator=generator) * 2 * math.pi
    args = (text, attn.norm_added_q.weight, image, attn.norm_q.weight, angles.cos(), angles.sin(), 1e-6, 16)
    scaled = qk_norm_rope(*args).float() * scale
    assert scaled.abs().max() <= fa.E4M3_MAX * (1 + 2**-7)  # the bound, up to bf16's rounding of it


@torch.no_grad()
def test_the_fp8_processor_stays_close_to_the_bf16_transformer() -> None:
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    assert apply_fp8_attention(model) == 2 + 3  # every double and single block's attention
    assert all(
        isinstance(module.processor, Fp8FluxAttnProcessor)
        for module in model.modules()
        if hasattr(module, "processor")
    )
    got = model(**inputs(bf16))[0]
    assert 0 < relative_rms(got, expected) < 0.1  # fp8's rounding, nothing worse


def options_error(**options: Any) -> str:
    with pytest.raises(ValueError) as raised:
        EngineOptions(attention_fp8=True, **options)
    return str(raised.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "--compile"),
        ({"compile": True, "fused_qk_norm_rope": False}, "fused query/key kernel"),
        ({"compile": True, "dtype": "float16"}, "bfloat16 weights"),
        ({"compile": True, "num_gpus": 2}, "one GPU"),
        ({"compile": True, "dit_cpu_offload": True}, "resident transformer"),
    ],
)
def test_attention_fp8_names_what_it_needs(options: dict[str, Any], named: str) -> None:
    assert named in options_error(**options)


def test_attention_fp8_is_off_by_default_and_the_flag_turns_it_on() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).attention_fp8 is False
    assert engine_options(parser.parse_args(["--compile", "--attention-fp8"])).attention_fp8 is True


def test_a_worker_without_a_hopper_gpu_is_refused_before_loading() -> None:
    with pytest.raises(fa.Fp8AttentionError, match="needs a CUDA GPU"):
        fa.check_fp8_attention_supported(torch.device("cpu"))


def test_the_compiled_engine_gives_flux1_attention_the_fp8_processor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "apply_regional_compile", lambda *args: None)  # no CPU compile here
    pipe = build_tiny_pipeline("flux1", seed=0).to(torch.bfloat16)
    options = EngineOptions(compile=True, attention_fp8=True, compile_vae=False, cuda_graphs=False)
    engine_module.FluxEngine.from_pipeline(pipe, options, torch.device("cpu"))
    processors = [module.processor for module in pipe.transformer.modules() if hasattr(module, "processor")]
    assert processors and all(isinstance(processor, Fp8FluxAttnProcessor) for processor in processors)


@torch.no_grad()
def test_compiled_blocks_trace_the_fp8_processor_in_one_graph() -> None:
    bf16 = torch.bfloat16
    eager = tiny_transformer(bf16)
    apply_fp8_attention(eager)
    expected = eager(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    apply_fp8_attention(model)
    model.compile_repeated_blocks(fullgraph=True)
    assert relative_rms(model(**inputs(bf16))[0], expected) < 0.05


def fp8_transformer() -> Any:
    pipe = SimpleNamespace(transformer=tiny_transformer(torch.bfloat16))
    with float8_on_cpu():
        apply_fp8(pipe, Fp8Config(), torch.device("cpu"))
    return pipe.transformer


@torch.no_grad()
def test_an_e4m3_output_projected_directly_matches_its_dequantized_projection() -> None:
    attn = fp8_transformer().transformer_blocks[0].attn
    out, descale = fa.quantize_per_tensor(attention_inputs(6, heads=2, head_dim=16)[0].bfloat16())
    direct = e4m3_project(attn.to_out[0], out, descale, torch.bfloat16)
    dequantized = attn.to_out[0]((out.float() * descale).bfloat16().flatten(2, 3))
    assert direct.shape == dequantized.shape and direct.dtype == torch.bfloat16
    assert relative_rms(direct, dequantized) < 0.05  # the per-row requantization's rounding, no more


@torch.no_grad()
def test_fp8_linears_with_fp8_attention_stay_close_with_and_without_the_direct_projection() -> None:
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    outputs = {}
    for direct in (True, False):
        model = fp8_transformer()
        apply_fp8_attention(model)
        for module in model.modules():
            if isinstance(getattr(module, "processor", None), Fp8FluxAttnProcessor):
                module.processor.project_e4m3 = direct
        outputs[direct] = model(**inputs(bf16))[0]
    assert relative_rms(outputs[True], outputs[False]) < 0.05
    assert relative_rms(outputs[True], expected) < 0.15  # fp8 linears and attention against bf16


class FakePlans:
    """A cuDNN graph's plan list as ``_keep_fastest`` walks it: times per plan, None for one that fails."""

    def __init__(self, times: list[float | None]) -> None:
        self.times, self.selected, self.built = times, -1, []

    def get_execution_plan_count(self) -> int:
        return len(self.times)

    def build_plan_at_index(self, index: int) -> None:
        if self.times[index] is None:
            raise RuntimeError("declined")
        self.selected = index
        self.built.append(index)

    def get_workspace_size_plan_at_index(self, index: int) -> int:
        return 64 * (index + 1)

    def get_plan_name_at_index(self, index: int) -> str:
        return f"eng{index}"

    def execute_plan_at_index(self, pack: Any, workspace: Any, index: int, handle: Any) -> float | None:
        return self.times[index]


def keep_fastest(times: list[float | None], monkeypatch: pytest.MonkeyPatch) -> tuple[bool, Any, FakePlans]:
    graph = FakePlans(times)
    monkeypatch.setattr(fp8_attention_cudnn, "_time_ms", lambda run: run())
    plan = fp8_attention_cudnn._Plan(graph, 0)
    return fp8_attention_cudnn._keep_fastest(plan, {}, None, torch.device("cpu")), plan, graph


def test_each_shape_keeps_the_fastest_plan_cudnn_proposes_and_skips_those_that_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran, plan, graph = keep_fastest([0.34, None, 0.32, 0.33], monkeypatch)
    assert ran and graph.selected == 2 and plan.workspace_bytes == 64 * 3
    assert plan.timings_ms == {"0: eng0": 0.34, "2: eng2": 0.32, "3: eng3": 0.33}
    ran, _, _ = keep_fastest([None, None], monkeypatch)
    assert not ran


def test_shapes_cudnn_cannot_plan_attend_in_bf16_from_then_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def declined(*args: Any) -> Any:
        calls.append(args)
        raise fa.Fp8AttentionError("no engine proposed a plan")

    monkeypatch.setattr(fp8_attention_cudnn, "_build_plan", declined)
    monkeypatch.setattr(fp8_attention_cudnn, "_device_state", lambda device: SimpleNamespace(handle=None))
    monkeypatch.setattr(fp8_attention_cudnn, "_PLANS", {})
    q8 = fa.quantize_per_tensor(attention_inputs(7)[0])[0]
    for _ in range(2):
        assert fp8_attention_cudnn._plan(q8, q8, q8, 0.25, {}) is None
    assert len(calls) == 1  # decided once per shape
