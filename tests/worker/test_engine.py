"""The FLUX engine on the tiny random-weight pipeline, loaded through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from shared.schemas import GenerationParams
from shared.settings import ModelCapabilities
from tests.support import generation_params
from worker.capabilities import CapabilityMismatch, check_capabilities
from worker.encode import encode_image
from worker.engine import FluxEngine, to_pil
from worker.options import EngineOptions


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> FluxEngine:
    return FluxEngine.load(str(tiny_model_dir), EngineOptions(device="cpu"))


def params(**overrides: object) -> GenerationParams:
    return generation_params(
        **{
            **{"prompt": "a lighthouse at dusk", "height": 80, "num_inference_steps": 3, "seed": 5},
            **overrides,
        }
    )


def png(engine: FluxEngine, **overrides: object) -> list[bytes]:
    output = engine.generate(params(**overrides), lambda step, total: None)
    return [encode_image(image, "png", 90) for image in output.images]


def test_engine_loads_the_pipeline_class_from_model_index(engine: FluxEngine) -> None:
    assert engine.pipeline_class == "FluxPipeline"


def test_same_seed_and_parameters_give_the_same_bytes(engine: FluxEngine) -> None:
    assert png(engine) == png(engine)
    assert png(engine) != png(engine, seed=6)


def test_each_image_of_a_batch_has_its_own_seed(engine: FluxEngine) -> None:
    batch = png(engine, num_images=2)
    assert len(batch) == 2 and batch[0] != batch[1]
    assert engine.generate(params(num_images=2), lambda s, t: None).images[1].size == (64, 80)


def test_step_callback_reports_every_step(engine: FluxEngine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate(params(num_inference_steps=4), lambda step, total: steps.append((step, total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_negative_prompt_runs_true_cfg(engine: FluxEngine) -> None:
    assert png(engine, negative_prompt="blurry", true_cfg_scale=2.0) != png(engine)


def test_capabilities_beyond_the_pipeline_are_refused() -> None:
    check_capabilities("FluxPipeline", "m", ModelCapabilities(negative_prompt=True))
    with pytest.raises(CapabilityMismatch, match="edit"):
        check_capabilities("FluxPipeline", "m", ModelCapabilities(edit=True, max_reference_images=1))
    with pytest.raises(CapabilityMismatch, match="negative_prompt"):
        check_capabilities("Flux2Pipeline", "m", ModelCapabilities(negative_prompt=True))
    with pytest.raises(CapabilityMismatch, match="not one of"):
        check_capabilities("StableDiffusionPipeline", "m", ModelCapabilities())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_become_the_bytes_diffusers_pil_output_gives(dtype: torch.dtype) -> None:
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # ties and the ends
    images = images.to(dtype)
    expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    converted = to_pil(images)
    assert [image.mode for image in converted] == ["RGB", "RGB"] and converted[0].size == (24, 16)
    for ours, theirs in zip(converted, expected, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    gray = to_pil(images[:, :1])
    assert gray[0].mode == "L"
    assert np.array_equal(
        np.asarray(gray[1]),
        np.asarray(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images[:, :1]))[1]),
    )
