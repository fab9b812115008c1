"""--quantize fp8: option checks, the layers it picks, and generation on the tiny pipeline.

torchao refuses float8 without an fp8 GPU, but torch's CPU ``_scaled_mm`` runs it:
``float8_on_cpu()`` lifts the refusal so the real quantized path runs here (slowly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from pydantic import ValidationError

from shared.settings import ModelConfig, ModelDefaults
from tests.support import generation_params
from worker.cli import add_worker_arguments, engine_options
from worker.engine import FluxEngine
from worker.optimizations.quantize import (
    Fp8Config,
    QuantizeError,
    apply_fp8,
    check_fp8_supported,
    float8_on_cpu,
    select_fp8_layers,
)
from worker.options import EngineOptions
from worker.startup import StartupError, load_engine
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")
DOUBLE_BLOCK_GEMMS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
SINGLE_BLOCK_GEMMS = ["attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp", "proj_out"]


def tiny_transformer(**overrides: object) -> FluxTransformer2DModel:
    config: dict[str, object] = {
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),
    }
    return FluxTransformer2DModel(**{**config, **overrides})


def fp8_weights(transformer: torch.nn.Module) -> set[str]:
    return {
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "Float8Tensor"
    }


def pixels(engine: FluxEngine) -> np.ndarray:
    image = engine.generate(generation_params(seed=3), lambda step, total: None).images[0]
    return np.asarray(image.convert("RGB")).astype(np.float64)


def test_fp8_picks_the_block_gemms_and_leaves_modulation_embedders_and_proj_out_in_bf16() -> None:
    expected = [f"transformer_blocks.{i}.{name}" for i in range(2) for name in DOUBLE_BLOCK_GEMMS]
    expected += [f"single_transformer_blocks.{i}.{name}" for i in range(2) for name in SINGLE_BLOCK_GEMMS]
    assert select_fp8_layers(tiny_transformer()) == sorted(expected)


def test_fp8_with_modulation_adds_the_blocks_adaln_linears_only() -> None:
    transformer = tiny_transformer()
    added = set(select_fp8_layers(transformer, Fp8Config(modulation=True))) - set(
        select_fp8_layers(transformer)
    )
    assert added == {
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear",
        "transformer_blocks.1.norm1.linear",
        "transformer_blocks.1.norm1_context.linear",
        "single_transformer_blocks.0.norm.linear",
        "single_transformer_blocks.1.norm.linear",
    }


def test_fp8_all_layers_is_every_linear_torchao_accepts_like_the_stock_recipe() -> None:
    transformer = tiny_transformer()
    chosen = select_fp8_layers(transformer, Fp8Config(layers="all"))
    linears = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert chosen == sorted(linears)
    assert {"x_embedder", "proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear"} <= set(chosen)


def test_fp8_skips_layers_whose_features_are_not_multiples_of_16() -> None:
    # attention_head_dim 24 x 2 heads: 48 wide blocks, but the 64-channel input and 4x MLP stay compatible;
    # joint_attention_dim 40 makes the text projections 40-wide on their input side.
    transformer = tiny_transformer(attention_head_dim=24, axes_dims_rope=(8, 8, 8), joint_attention_dim=40)
    chosen = select_fp8_layers(transformer, Fp8Config(layers="all"))
    assert "context_embedder" not in chosen  # 40 -> 48
    assert "transformer_blocks.0.attn.to_q" in chosen  # 48 -> 48
    odd = tiny_transformer(attention_head_dim=12, axes_dims_rope=(4, 4, 4))  # 24 wide: nothing fits
    assert select_fp8_layers(odd) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float32"}, "needs bfloat16 weights"),
        ({"dtype": "float16"}, "needs bfloat16 weights"),
        ({"dit_cpu_offload": True}, "keeps the transformer resident"),
        ({"gpu_memory_budget_gb": 24}, "keeps the transformer resident"),
    ],
)
def test_fp8_refuses_option_combinations_naming_the_flag(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=f"--quantize fp8 {message}"):
        EngineOptions(quantize="fp8", **options)


def test_fp8_combines_with_text_encoder_and_vae_offload() -> None:
    options = EngineOptions(quantize="fp8", text_encoder_cpu_offload=True, vae_cpu_offload=True, compile=True)
    assert options.quantize == "fp8"


def test_quantize_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args(["--quantize", "fp8"])).quantize == "fp8"
    monkeypatch.setenv("FLUXGATE_QUANTIZE", "fp8")
    assert engine_options(parser.parse_args([])).quantize == "fp8"
    with pytest.raises(SystemExit, match="--quantize fp8 needs bfloat16"):
        engine_options(parser.parse_args(["--dtype", "float32"]))


def test_fp8_on_a_cpu_worker_stops_before_loading_weights(tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="--quantize fp8 needs a CUDA GPU"):
        FluxEngine.load(str(tmp_path / "no-model-here"), EngineOptions(device="cpu", quantize="fp8"))
    model = ModelConfig(name="flux-tiny", path=str(tmp_path), defaults=ModelDefaults())
    with pytest.raises(StartupError, match=r"--quantize fp8 needs a CUDA GPU.*runs on cpu"):
        load_engine(model, EngineOptions(device="cpu", quantize="fp8"), {})


def test_fp8_needs_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(QuantizeError, match=r"compute capability >= 8.9.*NVIDIA A100 has 8.0"):
        check_fp8_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_supported(torch.device("cuda"))


def test_fp8_without_torchao_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizeError, match="--quantize fp8 needs torchao"):
        check_fp8_supported(torch.device("cuda"))


def test_fp8_needs_bfloat16_weights() -> None:
    with float8_on_cpu(), pytest.raises(QuantizeError, match="needs bfloat16 weights"):
        apply_fp8(build_tiny_pipeline("flux1"), Fp8Config(), CPU)  # the tiny pipeline is float32


def test_tiny_pipeline_generates_with_fp8_close_to_bf16() -> None:
    reference = pixels(FluxEngine(build_tiny_pipeline("flux1").to(torch.bfloat16), CPU))
    pipe = build_tiny_pipeline("flux1").to(torch.bfloat16)
    options = EngineOptions(device="cpu", dtype="bfloat16", quantize="fp8")
    with float8_on_cpu():
        engine = FluxEngine.from_pipeline(pipe, options, CPU)
    assert fp8_weights(pipe.transformer) == set(select_fp8_layers(pipe.transformer))
    assert "transformer_blocks.0.norm1.linear" not in fp8_weights(pipe.transformer)
    image = pixels(engine)
    assert image.shape == reference.shape == (64, 64, 3)
    psnr = 10 * np.log10(255**2 / ((image - reference) ** 2).mean())
    assert 30 < psnr < 100  # changed by fp8 rounding, but close


def test_per_tensor_scales_generate_too() -> None:
    pipe = build_tiny_pipeline("flux1").to(torch.bfloat16)
    with float8_on_cpu():
        chosen = apply_fp8(pipe, Fp8Config(granularity="tensor"), CPU)
    assert fp8_weights(pipe.transformer) == set(chosen)
    assert pixels(FluxEngine(pipe, CPU)).shape == (64, 64, 3)


def test_float8_on_cpu_restores_the_refusal_afterwards() -> None:
    with float8_on_cpu():
        check_fp8_supported(CPU)
    with pytest.raises(QuantizeError, match="needs a CUDA GPU"):
        check_fp8_supported(CPU)
