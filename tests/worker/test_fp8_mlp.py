"""fp8 MLP glue in one pass: torchao's quantization exactly, applied only to per-row fp8 layers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from worker.optimizations.fp8_mlp import (
    Fp8MlpFeedForward,
    Fp8MlpSingleBlock,
    apply_fp8_mlp_epilogues,
    fp8_quantize_rows,
    rowwise_fp8_linear,
)
from worker.optimizations.quantize import Fp8Config, apply_fp8, float8_on_cpu

from .transformer_support import inputs, tiny_transformer

CPU = torch.device("cpu")


def fp8_transformer() -> Any:
    pipe = SimpleNamespace(transformer=tiny_transformer(torch.bfloat16))
    with float8_on_cpu():
        apply_fp8(pipe, Fp8Config(), CPU)
    return pipe.transformer


def torchao_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    scale = _choose_scale_float8(rows, block_size=[1, rows.shape[-1]], float8_dtype=torch.float8_e4m3fn)
    return _quantize_affine_float8(rows, scale, torch.float8_e4m3fn), scale


def test_rows_are_quantized_as_torchao_quantizes_the_concatenation() -> None:
    generator = torch.Generator().manual_seed(0)
    head = (torch.randn(2, 5, 48, generator=generator) * 3).to(torch.bfloat16)
    tail = (torch.randn(2, 5, 80, generator=generator) * 5).to(torch.bfloat16)
    rows, scale = fp8_quantize_rows(head, tail, True)
    expected_rows, expected_scale = torchao_rows(
        torch.cat([head, F.gelu(tail, approximate="tanh")], dim=-1).reshape(10, 128)
    )
    assert rows.dtype == torch.float8_e4m3fn and rows.shape == (10, 128) and scale.shape == (10, 1)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(rows.view(torch.uint8), expected_rows.view(torch.uint8))
    rows, scale = fp8_quantize_rows(None, tail, False)  # no head, no GELU
    expected_rows, expected_scale = torchao_rows(tail.reshape(10, 80))
    assert torch.equal(rows.view(torch.uint8), expected_rows.view(torch.uint8))


def test_a_row_of_zeros_gets_zero_scale_and_zero_data_instead_of_nan() -> None:
    tail = torch.zeros(3, 32, dtype=torch.bfloat16)
    tail[1] = 1.0
    rows, scale = fp8_quantize_rows(None, tail, False)
    assert scale[0].item() == 0 and scale[2].item() == 0 and scale[1].item() > 0
    assert not rows.float().isnan().any() and rows[0].float().abs().sum() == 0


def test_op_schema_and_fake_tensor_agree_with_the_implementation() -> None:
    head = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    tail = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    torch.library.opcheck(fp8_quantize_rows, (head, tail, True))
    torch.library.opcheck(fp8_quantize_rows, (None, tail, False))


@torch.no_grad()
def test_one_pass_blocks_give_torchaos_output_bit_for_bit() -> None:
    model = fp8_transformer()
    expected = model(**inputs(torch.bfloat16))[0]
    assert apply_fp8_mlp_epilogues(model) == 2 * 2 + 3  # two feed-forwards per double block, each single
    assert isinstance(model.single_transformer_blocks[0], Fp8MlpSingleBlock)
    assert isinstance(model.transformer_blocks[0].ff_context, Fp8MlpFeedForward)
    assert torch.equal(model(**inputs(torch.bfloat16))[0], expected)
    assert apply_fp8_mlp_epilogues(model) == 0  # already applied


def test_bf16_layers_keep_their_forward() -> None:
    model = tiny_transformer(torch.bfloat16)
    assert not rowwise_fp8_linear(model.single_transformer_blocks[0].proj_out)
    assert apply_fp8_mlp_epilogues(model) == 0
    assert type(model.single_transformer_blocks[0]) is FluxSingleTransformerBlock
    assert type(model.transformer_blocks[0].ff) is FeedForward


@torch.no_grad()
def test_a_layer_swapped_in_later_is_called_as_it_is() -> None:
    model = fp8_transformer()
    apply_fp8_mlp_epilogues(model)
    block = model.single_transformer_blocks[0]
    calls: list[torch.Size] = []
    proj_out = torch.nn.Linear(block.proj_out.in_features, block.proj_out.out_features, dtype=torch.bfloat16)
    proj_out.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    block.proj_out = proj_out  # e.g. an adapter's wrapper: no longer torchao's per-row fp8 layer
    model(**inputs(torch.bfloat16))
    assert calls and calls[0][-1] == proj_out.in_features  # the concatenation, as diffusers builds it
