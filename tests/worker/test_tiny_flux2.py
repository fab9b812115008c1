"""Tests for the tiny random FLUX.2 pipeline (worker.tiny_flux2, kind "flux2" of worker.tiny_model)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import PIL.Image as PIL_Image
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2Pipeline

from worker.tiny_flux2 import JOINT_ATTENTION_DIM, TEXT_HIDDEN
from worker.tiny_model import DEV_SCHEDULER_CONFIG, TINY_KINDS, build_tiny_pipeline, save_tiny_model

# Flux2Pipeline rejects reference images under 64 px a side (Flux2ImageProcessor.check_image_input).
SIZE = 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("flux2"), "flux2")


def _load(path: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux2(saved: Path) -> Any:
    return _load(saved)


def _generate(pipe: Any, seed: int = 1, prompt: str = "a photo of a cat", **kwargs: Any) -> Any:
    """Like the worker: the pipeline's defaults (text_encoder_out_layers, max_sequence_length) are kept."""
    options = {"height": SIZE, "width": SIZE, "num_inference_steps": 2}
    options.update(kwargs)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options).images[0]


def test_flux2_is_a_tiny_kind() -> None:
    assert "flux2" in TINY_KINDS


def test_saved_flux2_loads_as_flux2_pipeline_and_generates_64px_quickly_with_default_out_layers(
    saved: Path,
) -> None:
    defaults = inspect.signature(Flux2Pipeline.__call__).parameters
    assert defaults["text_encoder_out_layers"].default == (10, 20, 30)
    pipe = _load(saved)
    assert pipe.tokenizer.chat_template  # survived save_pretrained / from_pretrained
    _generate(pipe)  # warm-up: first-call overheads are not what this measures
    # One intra-op thread: the 31-layer text encoder runs hundreds of tiny ops, and with two threads each of
    # them waits at an OpenMP barrier whenever another torch process on a small CI box holds a core (seen:
    # 0.1 s alone, 2-6 s beside a second suite). One thread measures the model, not the neighbours.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        image = _generate(pipe)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert isinstance(image, PIL_Image.Image)
    assert image.size == (SIZE, SIZE)
    assert elapsed < 2.0, f"tiny FLUX.2 64x64 2-step generation took {elapsed:.2f}s"
    assert type(pipe) is Flux2Pipeline  # last: mypy narrows `pipe` after this


def test_save_stays_small_on_disk(saved: Path) -> None:
    assert (saved / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    assert size < 10 * 1024 * 1024


def test_vae_keeps_flux2_8x_downsampling_and_32_latent_channels(flux2: Any) -> None:
    assert flux2.vae_scale_factor == 8
    assert flux2.vae.config.latent_channels == 32
    assert flux2.vae.bn.num_features == 128  # 2x2-patchified latents, as the pipeline normalizes them
    assert flux2.transformer.config.in_channels == 128
    latents = flux2.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode()
    assert latents.shape == (1, 32, SIZE // 8, SIZE // 8)
    # A 1024x1024 job gives (1024 / 16) ** 2 = 4096 image tokens, as with the real model.
    packed, _ = flux2.prepare_latents(1, 32, 1024, 1024, torch.float32, torch.device("cpu"), None)
    assert packed.shape == (1, 4096, 128)


def test_text_encoder_feeds_default_out_layers_into_joint_attention_dim(flux2: Any) -> None:
    text_config = flux2.text_encoder.config.text_config
    assert text_config.num_hidden_layers > 30  # hidden_states[30] exists and is not the final-norm output
    assert flux2.transformer.config.joint_attention_dim == JOINT_ATTENTION_DIM == 3 * TEXT_HIDDEN
    embeds, text_ids = flux2.encode_prompt("a photo of a cat", device=torch.device("cpu"))
    assert embeds.shape == (1, 512, JOINT_ATTENTION_DIM)
    assert text_ids.shape == (1, 512, 4)


def test_uses_dev_scheduler_config_and_guidance_embeds(flux2: Any) -> None:
    config = flux2.scheduler.config
    assert {key: config[key] for key in DEV_SCHEDULER_CONFIG} == DEV_SCHEDULER_CONFIG
    assert flux2.transformer.config.guidance_embeds is True


def test_same_generator_seed_gives_identical_bytes_and_different_seed_differs(flux2: Any) -> None:
    first, second = _generate(flux2, seed=7).tobytes(), _generate(flux2, seed=7).tobytes()
    assert first == second
    assert _generate(flux2, seed=8).tobytes() != first


def test_same_build_seed_gives_identical_weights_and_different_seed_differs() -> None:
    def weights(seed: int) -> dict[str, Any]:
        pipe: Any = build_tiny_pipeline("flux2", seed=seed)
        return {
            f"{name}.{key}": value
            for name in ("transformer", "vae", "text_encoder")
            for key, value in getattr(pipe, name).state_dict().items()
        }

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)
    assert not torch.equal(a["vae.bn.running_mean"], c["vae.bn.running_mean"])
    assert all(value.dtype == torch.float32 for value in a.values() if value.is_floating_point())


def test_edits_with_one_64px_reference_image(flux2: Any) -> None:
    reference = PIL_Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    image = _generate(flux2, image=[reference], height=None, width=None)  # size follows the reference
    assert image.size == (SIZE, SIZE)
    assert image.tobytes() != _generate(flux2).tobytes()


ODD_PROMPTS = [
    "🐱🚀 naïve café, 東京の夜 — «quoted» \t\n tabs",
    "a red cat " * 200,
    "",
    "<unk></s><pad>[INST][IMG]",
]


@pytest.mark.parametrize("prompt", ODD_PROMPTS, ids=["unicode-emoji", "2000-chars", "empty", "specials"])
def test_tokenizer_survives_odd_prompts(flux2: Any, prompt: str) -> None:
    messages = [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]]
    inputs = flux2.tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (1, 512)
    assert int(inputs["input_ids"].max()) < flux2.text_encoder.config.text_config.vocab_size
    assert isinstance(flux2.tokenizer.decode(inputs["input_ids"][0]), str)
    # Byte-level BPE: nothing is unknown, so any text round-trips exactly.
    assert flux2.tokenizer.decode(flux2.tokenizer(prompt).input_ids) == prompt
    assert _generate(flux2, prompt=prompt).size == (SIZE, SIZE)
