"""The fused query/key norm + rotary op: eager's output exactly, compiled, and only where it applies."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.fused_qkv import apply_fused_qkv
from worker.optimizations.qk_norm_rope import (
    FusedQKFluxAttnProcessor,
    apply_fused_qk_norm_rope,
    group_heads,
    qk_norm_rope,
    qk_pair_norm_rope,
    reference,
)

from .transformer_support import compiled_error, inputs, tiny_transformer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_fused_processor_gives_the_diffusers_output_exactly(dtype: torch.dtype) -> None:
    expected = tiny_transformer(dtype)(**inputs(dtype))[0]
    model = tiny_transformer(dtype)
    assert apply_fused_qk_norm_rope(model) == 2 + 3  # every double and single block's attention
    assert torch.equal(model(**inputs(dtype))[0], expected)


def test_compiled_blocks_trace_the_op_in_one_graph() -> None:
    assert compiled_error(apply_fused_qk_norm_rope) < 0.02


def test_op_schema_and_fake_tensor_agree_with_the_kernel() -> None:
    generator = torch.Generator().manual_seed(0)
    text, image = torch.randn(2, 5, 48, generator=generator), torch.randn(2, 7, 48, generator=generator)
    cos, sin = torch.randn(12, 16, generator=generator), torch.randn(12, 16, generator=generator)
    args = (text, torch.randn(16), image, torch.randn(16), cos, sin, 1e-6, 16)
    torch.library.opcheck(qk_norm_rope, args)
    out = qk_norm_rope(*args)
    assert out.shape == (2, 12, 3, 16) and out.transpose(1, 2).is_contiguous()  # SDPA's head-major layout
    assert torch.equal(out, reference(*args))
    token_major = (*args, None, True)
    torch.library.opcheck(qk_norm_rope, token_major)
    tokens_first = qk_norm_rope(*token_major)
    assert tokens_first.is_contiguous() and torch.equal(tokens_first, out)  # the same values, token-major


@pytest.mark.parametrize("token_major", [False, True])
def test_the_pair_op_gives_the_query_and_the_key_of_two_calls(token_major: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    joint = torch.randn(2, 12, 3 * 48, generator=generator)  # a GEMM's q/k/v output: the query, key, value
    text, image = joint[:, :5, : 2 * 48], joint[:, 5:, : 2 * 48]  # the query's features, then the key's
    weights = [1 + 0.1 * torch.randn(16, generator=generator) for _ in range(4)]
    cos, sin = torch.randn(12, 16, generator=generator), torch.randn(12, 16, generator=generator)
    args = (text, weights[0], weights[1], image, weights[2], weights[3], cos, sin, 1e-6, 16, token_major)
    torch.library.opcheck(qk_pair_norm_rope, args)
    pair = qk_pair_norm_rope(*args)
    assert pair.shape == (2, 2, 12, 3, 16) and pair[1].data_ptr() == pair[0].data_ptr() + pair[0].numel() * 4
    for index, (text_weight, image_weight) in enumerate(((weights[0], weights[2]), (weights[1], weights[3]))):
        features = slice(index * 48, (index + 1) * 48)
        one = qk_norm_rope(
            text[..., features],
            text_weight,
            image[..., features],
            image_weight,
            cos,
            sin,
            1e-6,
            16,
            None,
            token_major,
        )
        assert torch.equal(pair[index], one) and pair[index].stride() == one.stride()


def paired_model(paired: bool) -> torch.nn.Module:
    model = tiny_transformer(torch.bfloat16)
    apply_fused_qk_norm_rope(model)
    assert apply_fused_qkv(model, FusedQKFluxAttnProcessor) == 5
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), FusedQKFluxAttnProcessor):
            module.processor.paired_qk = paired
    return model


@torch.no_grad()
def test_fused_projections_norm_the_query_and_key_in_one_call_with_the_same_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = {"pair": 0, "one": 0}
    pair, one = qk_module.qk_pair_norm_rope, qk_module.qk_norm_rope

    def count(name: str, op: Any) -> Any:
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or op(*args)

    monkeypatch.setattr(qk_module, "qk_pair_norm_rope", count("pair", pair))
    monkeypatch.setattr(qk_module, "qk_norm_rope", count("one", one))
    separately = paired_model(False)(**inputs(torch.bfloat16))[0]
    assert calls == {"pair": 0, "one": 2 * 5}
    together = paired_model(True)(**inputs(torch.bfloat16))[0]
    assert calls == {"pair": 5, "one": 2 * 5}  # one call for each attention's query and key
    assert torch.equal(together, separately)


def test_the_processor_hands_attention_token_major_queries_and_keys() -> None:
    """cuDNN writes its output in the query's layout: token-major, the output projection reads it as is."""
    model = tiny_transformer(torch.bfloat16)
    apply_fused_qk_norm_rope(model)
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object, **kwargs: object):
        seen.append((query.transpose(1, 2).is_contiguous(), key.transpose(1, 2).is_contiguous()))
        return original(query, key, value, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model(**inputs(torch.bfloat16))
    assert seen == [(True, True)] * 5  # (batch, heads, tokens, head_dim) views of token-major storage


def test_text_free_calls_rotate_the_image_tokens_only() -> None:
    generator = torch.Generator().manual_seed(1)
    image, weight = torch.randn(1, 6, 32, generator=generator), torch.randn(16, generator=generator)
    cos, sin = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    out = qk_norm_rope(image[:, :0], weight, image, weight, cos, sin, 1e-6, 16)
    assert out.shape == (1, 6, 2, 16)


def test_sequence_parallel_and_other_processors_keep_theirs() -> None:
    model = tiny_transformer()
    parallel = model.transformer_blocks[0].attn
    parallel.processor._parallel_config = object()  # as diffusers' context parallelism sets it
    other = model.single_transformer_blocks[0].attn
    other.processor = type("OtherProcessor", (FluxAttnProcessor,), {})()
    assert apply_fused_qk_norm_rope(model) == 5 - 2
    assert type(parallel.processor) is FluxAttnProcessor
    assert not isinstance(other.processor, FusedQKFluxAttnProcessor)
    assert isinstance(model.single_transformer_blocks[1].attn.processor, FusedQKFluxAttnProcessor)


def test_the_attention_backend_carries_over() -> None:
    model = tiny_transformer()
    model.set_attention_backend("native")
    apply_fused_qk_norm_rope(model)
    processors = [module.processor for module in model.modules() if hasattr(module, "processor")]
    assert {processor._attention_backend for processor in processors} == {"native"}


def test_each_kernel_program_takes_the_largest_power_of_two_group_of_heads_up_to_eight() -> None:
    assert [group_heads(heads) for heads in (24, 16, 6, 3, 2)] == [8, 8, 2, 1, 2]
