"""One GEMM per stream for the query, key and value, over one buffer of their weights: the same output,
no added memory, the state dict unchanged, views into the norm-and-rotate kernel and the attention."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import fused_qkv as fused_module
from worker.optimizations.fused_qkv import apply_fused_qkv, fuse_qkv_weights, fused_buffers, projected_qkv
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

from .transformer_support import compiled_error, inputs, tiny_transformer


def attentions(model: torch.nn.Module) -> list[Any]:
    return [module for module in model.modules() if hasattr(module, "processor")]


def fused_model(dtype: torch.dtype = torch.float32) -> Any:
    model = tiny_transformer(dtype)
    apply_fused_qk_norm_rope(model)
    assert apply_fused_qkv(model, FusedQKFluxAttnProcessor) == 5  # 2 double blocks, 3 single blocks
    return model


def test_the_fused_weights_are_the_layers_own_storage_and_the_state_dict_is_unchanged() -> None:
    model = tiny_transformer()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    size = sum(p.numel() for p in model.parameters())
    apply_fused_qk_norm_rope(model)
    apply_fused_qkv(model, FusedQKFluxAttnProcessor)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == size
    block = model.transformer_blocks[0].attn
    weight, bias = fused_buffers(block, "text") or (None, None)
    assert weight is not None and bias is not None
    assert block.add_k_proj.weight.data_ptr() == weight.data_ptr() + block.add_q_proj.weight.numel() * 4
    with torch.no_grad():  # an in-place load reaches the buffer
        block.add_v_proj.bias.fill_(3.0)
    assert bool((bias[-block.add_v_proj.out_features :] == 3.0).all())


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_the_fused_projections_give_the_three_projections_values(batch: int) -> None:
    attn = fused_model().transformer_blocks[0].attn
    text, image = torch.randn(batch, 7, 32), torch.randn(batch, 36, 32)
    fused = projected_qkv(attn, image, text)
    assert fused is not None and fused.query_key is not None
    (text_q, image_q), (text_k, image_k), (no_text, value), (text_qk, image_qk) = fused
    assert no_text is None and text_q is not None and text_k is not None and text_qk is not None
    torch.testing.assert_close(image_q, attn.to_q(image))
    torch.testing.assert_close(text_k, attn.add_k_proj(text))
    torch.testing.assert_close(image_k, attn.to_k(image))
    torch.testing.assert_close(value, torch.cat([attn.add_v_proj(text), attn.to_v(image)], dim=1))
    torch.testing.assert_close(text_qk, torch.cat([text_q, text_k], dim=-1))  # the query's, then the key's
    torch.testing.assert_close(image_qk, torch.cat([image_q, image_k], dim=-1))
    single = fused_model().single_transformer_blocks[0].attn
    single_fused = projected_qkv(single, image, None)
    assert single_fused is not None and single_fused.query_key is not None
    torch.testing.assert_close(single_fused.query[1], single.to_q(image))
    torch.testing.assert_close(single_fused.value[1], single.to_v(image))
    torch.testing.assert_close(
        single_fused.query_key[1], torch.cat([single.to_q(image), single.to_k(image)], -1)
    )
    assert single_fused.query[0] is None and single_fused.query_key[0] is None


@torch.no_grad()
def test_the_transformer_with_fused_projections_gives_the_same_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected_model = tiny_transformer()
    apply_fused_qk_norm_rope(expected_model)
    expected = expected_model(**inputs(torch.float32))[0]
    calls: list[int] = []
    projected = fused_module.projected_qkv
    monkeypatch.setattr(
        "worker.optimizations.qk_norm_rope.projected_qkv", lambda *a: calls.append(1) or projected(*a)
    )
    torch.testing.assert_close(fused_model()(**inputs(torch.float32))[0], expected)
    assert len(calls) == 5


def test_layers_that_cannot_share_one_gemm_keep_theirs() -> None:
    model = tiny_transformer()
    hooked = model.transformer_blocks[0].attn
    hooked.add_k_proj.register_forward_hook(lambda *args: None)
    unbiased = model.single_transformer_blocks[0].attn
    unbiased.to_v.bias = None
    assert not fuse_qkv_weights(hooked)  # its image stream fused, its text stream cannot: neither kept
    assert not hasattr(hooked, "fused_image_qkv_weight")
    assert not fuse_qkv_weights(unbiased)
    narrower = model.single_transformer_blocks[2].attn  # a key and value narrower than the query (GQA)
    narrower.to_k = torch.nn.Linear(32, 16)
    assert not fuse_qkv_weights(narrower)
    assert fuse_qkv_weights(model.single_transformer_blocks[1].attn)


@torch.no_grad()
def test_a_weight_assigned_anew_after_fusing_takes_the_three_gemm_path() -> None:
    attn = fused_model().single_transformer_blocks[0].attn
    image = torch.randn(1, 36, 32)
    attn.to_k.weight = torch.nn.Parameter(torch.zeros_like(attn.to_k.weight))
    assert fused_buffers(attn, "image") is None and projected_qkv(attn, image, None) is None


def test_under_compile_the_views_reach_the_kernel_and_the_attention_without_a_copy() -> None:
    attn = fused_model().transformer_blocks[0].attn
    text, image, cos, sin = (
        torch.randn(1, 7, 32),
        torch.randn(1, 36, 32),
        torch.randn(43, 16),
        torch.randn(43, 16),
    )

    def joint(text: torch.Tensor, image: torch.Tensor) -> Any:
        fused = projected_qkv(attn, image, text)
        assert fused is not None and fused.query_key is not None
        text_qk, image_qk = fused.query_key
        weights = (attn.norm_added_q.weight, attn.norm_added_k.weight, attn.norm_q.weight, attn.norm_k.weight)
        pair = torch.ops.fluxgate.qk_pair_norm_rope(
            text_qk, *weights[:2], image_qk, *weights[2:], cos, sin, 1e-6, 16
        )
        return pair, fused.value[1] * 2

    with torch.inference_mode():
        _, (code, *_) = run_and_get_code(torch.compile(joint, fullgraph=True), text, image)
    body = code.split("def call")[1]
    assert body.count("fluxgate.linear_into.default(") == 2
    kernel_call = next(line for line in body.splitlines() if "fluxgate.qk_pair_norm_rope.default(" in line)
    # the query's and key's text rows and image rows, views of the GEMMs' output, no copies
    assert kernel_call.count("reinterpret_tensor(buf0") == 2


def test_a_compiled_fused_transformer_keeps_one_graph_and_its_output() -> None:
    def prepare(model: Any) -> None:
        apply_fused_qk_norm_rope(model)
        assert apply_fused_qkv(model, FusedQKFluxAttnProcessor) == 5

    assert compiled_error(prepare) < 0.02


@pytest.mark.parametrize(
    ("options", "fused"),
    [
        ({"compile": True}, True),
        ({}, False),  # the fused processor is --compile's
        ({"compile": True, "fused_qkv": False}, False),
        ({"compile": True, "attention_fp8": True}, False),  # fp8's processor projects its own way
        ({"compile": True, "dit_cpu_offload": True}, False),  # streamed weights: no fused processor
        ({"compile": True, "num_gpus": 2}, False),  # a group's processor exchanges its projections
    ],
)
def test_the_engine_fuses_the_projections_where_its_fused_processor_runs_on_one_gpu(
    options: dict[str, Any], fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "apply_sequence_parallel", lambda *args: None)
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(**options), torch.device("cpu"))
    found = [fused_buffers(attn, "image") is not None for attn in attentions(pipe.transformer)]
    assert found and all(found) if fused else not any(found)


def test_fused_projections_are_on_by_default_and_the_flag_turns_them_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).fused_qkv is True
    assert engine_options(parser.parse_args(["--compile", "--no-fused-qkv"])).fused_qkv is False
