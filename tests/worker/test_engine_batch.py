"""The engine's batch call on tiny random-weight pipelines: each job's image is the one it gets alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.schemas import GenerationParams
from tests.support import generation_params
from worker.engine import FluxEngine
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> FluxEngine:
    return FluxEngine.load(str(tiny_model_dir), EngineOptions(device="cpu"))


def params(prompt: str, seed: int, **overrides: object) -> GenerationParams:
    values = {"prompt": prompt, "seed": seed, "height": 80, "num_inference_steps": 3, **overrides}
    return generation_params(**values)


def assert_same_image(batched: Image.Image, alone: Image.Image) -> None:
    """Equal up to the batched kernels' rounding: a pixel level here and there, not another image."""
    a, b = np.asarray(batched, dtype=np.int16), np.asarray(alone, dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.001


def alone(engine: FluxEngine, job: GenerationParams) -> Image.Image:
    return engine.generate(job, lambda step, total: None).images[0]


def test_each_job_of_a_batch_gets_the_image_it_gets_alone(engine: FluxEngine) -> None:
    jobs = [params("a lighthouse at dusk", 5), params("a cat on a mat", 77), params("rain", 2**32 - 1)]
    output = engine.generate_batch(jobs, lambda step, total: None)
    assert len(output.images) == 3 and output.peak_memory_mb
    for job, image in zip(jobs, output.images, strict=True):
        assert image.size == (64, 80)
        assert_same_image(image, alone(engine, job))
    assert np.asarray(output.images[0]).tolist() != np.asarray(output.images[1]).tolist()


def test_a_batch_with_a_negative_prompt_matches_its_jobs_alone(engine: FluxEngine) -> None:
    jobs = [
        params(prompt, seed, negative_prompt="blurry", true_cfg_scale=2.0)
        for prompt, seed in [("a", 1), ("b", 2)]
    ]
    output = engine.generate_batch(jobs, lambda step, total: None)
    for job, image in zip(jobs, output.images, strict=True):
        assert_same_image(image, alone(engine, job))


@pytest.mark.parametrize("kind", ["kontext", "flux2"])
def test_other_pipeline_kinds_batch_text_to_image_jobs_too(kind: str) -> None:
    engine = FluxEngine.from_pipeline(
        build_tiny_pipeline(kind), EngineOptions(device="cpu"), torch.device("cpu")
    )
    jobs = [params("a red boat", 9, model="m", height=64), params("a blue car", 10, model="m", height=64)]
    output = engine.generate_batch(jobs, lambda step, total: None)
    for job, image in zip(jobs, output.images, strict=True):
        assert_same_image(image, alone(engine, job))


def test_the_step_callback_hears_each_step_once_for_the_whole_batch(engine: FluxEngine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate_batch([params("a", 1), params("b", 2)], lambda step, total: steps.append((step, total)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("difference", [{"width": 128}, {"num_inference_steps": 2}, {"num_images": 2}])
def test_jobs_that_differ_in_more_than_prompt_and_seed_are_refused(
    engine: FluxEngine, difference: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match="differ only in prompt and seed"):
        engine.generate_batch([params("a", 1), params("b", 2, **difference)], lambda step, total: None)


def test_warm_up_runs_every_batch_size_up_to_the_maximum(
    engine: FluxEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    original = engine.generate_batch
    monkeypatch.setattr(
        engine, "generate_batch", lambda batch, on_step: sizes.append(len(batch)) or original(batch, on_step)
    )
    assert engine.warmup_batches([(64, 64)], ["off"], max_batch_size=4, steps=1) > 0
    assert sizes == [2, 3, 4]
