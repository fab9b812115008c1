"""--image-rows-last: the last single block computes its image rows only, since the model discards its text
rows; the same output, and only where the block and its processor take it."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit
from worker.optimizations.epilogues import apply_gemm_epilogues, image_rows_last
from worker.optimizations.fp8_attention_processor import apply_fp8_attention
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.tiny_model import build_tiny_pipeline

from .device_support import compiled_engine_transformer
from .transformer_support import compiled_error, inputs, relative_rms, tiny_transformer


def prepared(model: Any) -> Any:
    apply_fused_qk_norm_rope(model)
    apply_gemm_epilogues(model)
    return model


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 0.01)])
@torch.no_grad()
def test_the_last_block_on_image_rows_gives_the_models_output(dtype: torch.dtype, tolerance: float) -> None:
    expected = prepared(tiny_transformer(dtype))(**inputs(dtype))[0]
    model = prepared(tiny_transformer(dtype))
    assert image_rows_last(model)
    assert relative_rms(model(**inputs(dtype))[0], expected) < tolerance


@torch.no_grad()
def test_only_the_last_single_block_attends_with_its_image_rows_as_queries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = prepared(tiny_transformer())
    image_rows_last(model)
    assert [block.image_rows_only for block in model.single_transformer_blocks] == [False, False, True]
    query_rows: list[int] = []
    real = FusedQKFluxAttnProcessor._local_attention

    def counted(self: Any) -> Any:
        attend = real(self)
        return lambda q, k, v: (query_rows.append(q.shape[1]), attend(q, k, v))[1]

    monkeypatch.setattr(FusedQKFluxAttnProcessor, "_local_attention", counted)
    model(**inputs(torch.float32))
    text, image = 7, 36
    assert query_rows == [text + image] * 4 + [image]


def test_blocks_without_the_epilogue_forward_or_the_fused_processor_keep_every_row() -> None:
    plain = tiny_transformer()
    assert not image_rows_last(plain)  # diffusers' single blocks
    unfused = tiny_transformer()
    apply_gemm_epilogues(unfused)
    assert not image_rows_last(unfused)  # diffusers' processor takes no queries_from
    fp8 = tiny_transformer(torch.bfloat16)
    apply_fp8_attention(fp8)
    apply_gemm_epilogues(fp8)
    assert not image_rows_last(fp8)  # the fp8 processor attends every row's query


def test_the_fused_processor_refuses_queries_from_in_a_double_block() -> None:
    model = prepared(tiny_transformer())
    block = model.transformer_blocks[0]
    hidden = torch.randn(1, 36, 16 * 2)
    text = torch.randn(1, 7, 16 * 2)
    rope = model.pos_embed(torch.cat([torch.zeros(7, 3), torch.randn(36, 3)]))
    with pytest.raises(ValueError, match="single block on one GPU"):
        block.attn.processor(block.attn, hidden, text, image_rotary_emb=rope, queries_from=7)


def test_compiled_blocks_trace_the_image_rows_block_in_one_graph() -> None:
    def image_rows(model: Any) -> None:
        prepared(model)
        image_rows_last(model)

    assert compiled_error(image_rows) < 0.02


def test_cache_dit_presets_give_the_same_image_with_the_last_blocks_image_rows() -> None:
    presets = {"fast": CacheDitConfig(enabled=True, scm_preset="fast", scm_policy="static")}
    images = []
    for rows in (False, True):
        pipe = build_tiny_pipeline("flux1", seed=0)
        controller = apply_cache_dit(pipe, presets)
        prepared(pipe.transformer)
        if rows:
            assert image_rows_last(pipe.transformer)
        controller.prepare("fast", 12, true_cfg=False)
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.inference_mode():
            size = {"width": 64, "height": 64}
            output = pipe("a red cat", **size, num_inference_steps=12, generator=generator, output_type="pt")
        assert controller.cached_steps() > 0
        images.append(output.images)
    assert relative_rms(images[1], images[0]) < 1e-5


def test_the_compiled_engine_computes_the_last_blocks_image_rows_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transformer = compiled_engine_transformer(monkeypatch)
    assert transformer.single_transformer_blocks[-1].image_rows_only is True
    transformer = compiled_engine_transformer(monkeypatch, image_rows_last=False)
    assert transformer.single_transformer_blocks[-1].image_rows_only is False
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).image_rows_last is True
    assert engine_options(parser.parse_args(["--no-image-rows-last"])).image_rows_last is False


def test_processors_attend_image_rows_through_fa4_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = torch.bfloat16
    expected = prepared(tiny_transformer(bf16))(**inputs(bf16))[0]
    model = prepared(tiny_transformer(bf16))
    image_rows_last(model)
    qk_module.use_fa4_attention(model)
    with torch.no_grad():
        assert relative_rms(model(**inputs(bf16))[0], expected) < 0.01
