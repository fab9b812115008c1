"""Load-time options on the tiny pipeline: attention backend, custom VAE, offload hooks, compile."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.hooks.group_offloading import _get_group_onload_device

from shared.schemas import GenerationParams
from tests.support import generation_params
from worker.engine import FluxEngine
from worker.optimizations.attention import AttentionBackendError, apply_attention_backend
from worker.optimizations.compile import CompileConfig, apply_regional_compile
from worker.optimizations.offload import OffloadConfig, apply_offload, component_bytes, plan_budget
from worker.optimizations.vae import VaeError
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline


def params(**overrides: object) -> GenerationParams:
    return generation_params(**{**{"model": "m", "prompt": "a harbour", "seed": 3}, **overrides})


def run(pipe_or_engine: Any) -> Any:
    engine = (
        pipe_or_engine
        if isinstance(pipe_or_engine, FluxEngine)
        else FluxEngine(pipe_or_engine, torch.device("cpu"))
    )
    return engine.generate(params(), lambda step, total: None).images[0]


def is_group_offloaded(module: torch.nn.Module) -> bool:
    try:
        _get_group_onload_device(module)
    except ValueError:
        return False
    return True


def test_attention_backend_is_set_on_the_transformer() -> None:
    pipe = build_tiny_pipeline("flux1")
    apply_attention_backend(pipe, "_native_math")
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend.value == "_native_math" for p in processors)
    run(pipe)


@pytest.mark.parametrize(
    ("backend", "message"), [("warp-drive", "not a diffusers backend"), ("flash", "cannot run here")]
)
def test_bad_attention_backends_fail_at_load_naming_the_flag(backend: str, message: str) -> None:
    with pytest.raises(AttentionBackendError, match=f"--attention-backend.*{message}"):
        apply_attention_backend(build_tiny_pipeline("flux1"), backend)


def save_tiny_autoencoder(directory: Path, latent_channels: int) -> str:
    torch.manual_seed(0)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    )
    vae.save_pretrained(directory)
    return str(directory)


def test_vae_path_replaces_the_vae_with_a_tiny_autoencoder(tiny_model_dir: Path, tmp_path: Path) -> None:
    vae_path = save_tiny_autoencoder(tmp_path / "taef1", latent_channels=16)
    engine = FluxEngine.load(str(tiny_model_dir), EngineOptions(device="cpu", vae_path=vae_path))
    assert type(engine.pipeline.vae).__name__ == "AutoencoderTiny"
    assert run(engine).size == (64, 64)


def test_vae_with_the_wrong_latent_channels_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    vae_path = save_tiny_autoencoder(tmp_path / "taesd", latent_channels=4)
    with pytest.raises(VaeError, match=r"--vae-path.*4 latent channels"):
        FluxEngine.load(str(tiny_model_dir), EngineOptions(device="cpu", vae_path=vae_path))


def test_missing_vae_path_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VaeError, match="--vae-path"):
        FluxEngine.load(str(tiny_model_dir), EngineOptions(device="cpu", vae_path=str(tmp_path / "none")))


def test_offload_flags_install_group_offloading_on_the_chosen_components() -> None:
    pipe = build_tiny_pipeline("flux1")
    reference = run(build_tiny_pipeline("flux1"))
    offloaded = apply_offload(pipe, OffloadConfig(dit=True, text_encoder=True), torch.device("cpu"))
    assert offloaded == {"transformer", "text_encoder", "text_encoder_2"}
    assert all(is_group_offloaded(getattr(pipe, name)) for name in offloaded)
    assert not is_group_offloaded(pipe.vae)
    assert run(pipe).tobytes() == reference.tobytes()


def test_a_text_encoder_sharded_over_the_group_is_left_where_it_is_for_the_sharding_to_place() -> None:
    pipe = build_tiny_pipeline("flux1")
    offloaded = apply_offload(
        pipe, OffloadConfig(), torch.device("meta"), placed_elsewhere=frozenset({"text_encoder_2"})
    )
    assert offloaded == set()
    assert next(pipe.transformer.parameters()).device.type == "meta"
    assert next(pipe.text_encoder.parameters()).device.type == "meta"
    assert next(pipe.text_encoder_2.parameters()).device.type == "cpu"


def test_vae_offload_flag_offloads_only_the_vae() -> None:
    pipe = build_tiny_pipeline("flux1")
    assert apply_offload(pipe, OffloadConfig(vae=True), torch.device("cpu")) == {"vae"}
    assert is_group_offloaded(pipe.vae) and not is_group_offloaded(pipe.transformer)


def test_memory_budget_offloads_the_largest_components_until_the_rest_fits() -> None:
    pipe = build_tiny_pipeline("flux1")
    sizes = {
        name: component_bytes(getattr(pipe, name))
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    total, largest = sum(sizes.values()), max(sizes, key=sizes.__getitem__)
    assert plan_budget(pipe, total / 1e9) == set()
    assert plan_budget(pipe, (total - 1) / 1e9) == {largest}
    assert plan_budget(pipe, 1e-12) == set(sizes)


def test_engine_options_reject_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="--pin-cpu-memory"):
        EngineOptions(pin_cpu_memory=True)
    with pytest.raises(ValueError, match="--gpu-memory-budget-gb"):
        EngineOptions(dit_cpu_offload=True, gpu_memory_budget_gb=20)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        EngineOptions(warmup_resolutions="1024x1000")
    assert EngineOptions(warmup_resolutions="1024x1024, 768x1344").resolutions == [(1024, 1024), (768, 1344)]


def test_regional_compile_compiles_each_repeated_block_and_sets_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("QUACK_CACHE_DIR", raising=False)
    pipe = build_tiny_pipeline("flux1")
    reference = run(build_tiny_pipeline("flux1"))
    apply_regional_compile(pipe, CompileConfig(cache_dir=str(tmp_path / "cache"), backend="eager"))
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache").resolve())
    assert os.environ["QUACK_CACHE_DIR"] == str((tmp_path / "cache" / "quack").resolve())
    assert run(pipe).tobytes() == reference.tobytes()
