"""Tests for worker.tiny_model: tiny random FLUX pipelines that load like real checkpoints, on CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import PIL.Image as PIL_Image
import pytest
import torch
from diffusers import DiffusionPipeline, FluxKontextPipeline, FluxPipeline

from worker.tiny_model import (
    DEV_SCHEDULER_CONFIG,
    TINY_KINDS,
    build_tiny_pipeline,
    save_tiny_model,
)

SIZE = 64


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny kind saved once for the module."""
    return {kind: save_tiny_model(tmp_path_factory.mktemp(kind), kind) for kind in TINY_KINDS}


def _load(path: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux1(saved_models: dict[str, Path]) -> Any:
    return _load(saved_models["flux1"])


def _generate(pipe: Any, seed: int = 1, prompt: str = "a photo of a cat", **kwargs: Any) -> Any:
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "max_sequence_length": 64}
    options.update(kwargs)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images[0]


def test_saved_flux1_loads_as_flux_pipeline_and_generates_a_64px_image_quickly(
    saved_models: dict[str, Path],
) -> None:
    pipe = _load(saved_models["flux1"])
    assert type(pipe) is FluxPipeline
    _generate(pipe)  # warm-up: first-call overheads are not what this measures
    started = time.perf_counter()
    image = _generate(pipe)
    elapsed = time.perf_counter() - started
    assert isinstance(image, PIL_Image.Image)
    assert image.size == (SIZE, SIZE)
    assert elapsed < 5.0, f"tiny 64x64 2-step generation took {elapsed:.2f}s"


def test_save_returns_the_directory_and_stays_small_on_disk(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "model"
    assert save_tiny_model(str(target), "flux1") == target
    assert (target / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert size < 10 * 1024 * 1024


def test_vae_keeps_flux_8x_downsampling_and_16_latent_channels(flux1: Any) -> None:
    assert flux1.vae_scale_factor == 8
    assert flux1.vae.config.latent_channels == 16
    assert flux1.transformer.config.in_channels == 64
    # A 1024x1024 job packs to (1024 / 16) ** 2 = 4096 image tokens, as with the real model.
    latents = flux1.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode()
    assert latents.shape == (1, 16, SIZE // 8, SIZE // 8)


def test_flux1_uses_dev_scheduler_config_and_guidance_embeds(flux1: Any) -> None:
    config = flux1.scheduler.config
    assert {key: config[key] for key in DEV_SCHEDULER_CONFIG} == DEV_SCHEDULER_CONFIG
    assert flux1.transformer.config.guidance_embeds is True


def test_same_generator_seed_gives_identical_bytes_and_different_seed_differs(
    flux1: Any,
) -> None:
    first, second = _generate(flux1, seed=7).tobytes(), _generate(flux1, seed=7).tobytes()
    assert first == second
    assert _generate(flux1, seed=8).tobytes() != first


def test_same_build_seed_gives_identical_weights_and_different_seed_differs() -> None:
    def weights(seed: int) -> dict[str, Any]:
        pipe = build_tiny_pipeline("flux1", seed=seed)
        return {
            f"{name}.{key}": value
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
            for key, value in getattr(pipe, name).state_dict().items()
        }

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    assert all(value.dtype == torch.float32 for value in a.values() if value.is_floating_point())


def test_kontext_loads_as_kontext_pipeline_and_edits_an_image(saved_models: dict[str, Path]) -> None:
    pipe = _load(saved_models["kontext"])
    assert pipe.transformer.config.guidance_embeds is True
    image = _generate(
        pipe, image=PIL_Image.new("RGB", (SIZE, SIZE)), _auto_resize=False, max_area=SIZE * SIZE
    )
    assert image.size == (SIZE, SIZE)
    assert type(pipe) is FluxKontextPipeline  # last: mypy narrows `pipe` after this


def test_schnell_has_no_guidance_embeds_and_runs_without_guidance(saved_models: dict[str, Path]) -> None:
    pipe = _load(saved_models["schnell"])
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.scheduler.config.use_dynamic_shifting is False
    assert _generate(pipe, guidance_scale=0.0).size == (SIZE, SIZE)
    assert type(pipe) is FluxPipeline  # last: mypy narrows `pipe` after this


@pytest.mark.parametrize("function", [build_tiny_pipeline, save_tiny_model])
def test_unknown_kind_raises_value_error_naming_the_kind(function: object, tmp_path: Path) -> None:
    args = (tmp_path, "flux2-pro") if function is save_tiny_model else ("flux2-pro",)
    with pytest.raises(ValueError, match="flux2-pro"):
        function(*args)  # type: ignore[operator]


ODD_PROMPTS = ["🐱🚀 naïve café, 東京の夜 — «quoted» \t\n tabs", "a red cat " * 200, "", "<unk></s><pad>"]


@pytest.mark.parametrize("prompt", ODD_PROMPTS, ids=["unicode-emoji", "2000-chars", "empty", "specials"])
def test_tokenizers_survive_odd_prompts(flux1: Any, prompt: str) -> None:
    clip = flux1.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    t5 = flux1.tokenizer_2(prompt, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert clip.input_ids.shape == (1, 77)
    assert t5.input_ids.shape == (1, 512)
    assert int(clip.input_ids.max()) < flux1.text_encoder.config.vocab_size
    assert int(t5.input_ids.max()) < flux1.text_encoder_2.config.vocab_size
    assert isinstance(flux1.tokenizer.batch_decode(clip.input_ids)[0], str)
    assert _generate(flux1, prompt=prompt, max_sequence_length=512).size == (SIZE, SIZE)
