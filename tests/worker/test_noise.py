"""The starting noise drawn on a thread: the same images as the pipeline's own draw, or its own draw."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worker.noise import noise_drawn_ahead, noise_shape
from worker.tiny_model import build_tiny_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def pipe() -> Any:
    pipeline: Any = build_tiny_pipeline("flux1", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def call_kwargs(
    prompt: str | list[str], seeds: list[int], size: int = SIZE, images: int = 1
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "width": size,
        "height": size,
        "num_inference_steps": 2,
        "num_images_per_prompt": images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        "output_type": "pt",
    }


def generate(pipe: Any, kwargs: dict[str, Any], ahead: bool) -> torch.Tensor:
    with torch.inference_mode():
        if not ahead:
            return pipe(**kwargs).images
        with noise_drawn_ahead(pipe, kwargs):
            return pipe(**kwargs).images


@pytest.mark.parametrize(
    ("prompt", "seeds", "images"),
    [("a red cat", [3], 1), (["a red cat", "a blue dog"], [3, 4], 1), ("a", [1, 2], 2)],
)
def test_noise_drawn_ahead_gives_the_pipelines_images(
    pipe: Any, prompt: Any, seeds: list[int], images: int
) -> None:
    expected = generate(pipe, call_kwargs(prompt, seeds, images=images), ahead=False)
    kwargs = call_kwargs(prompt, seeds, images=images)
    assert torch.equal(generate(pipe, kwargs, ahead=True), expected)
    unused = [torch.Generator("cpu").manual_seed(seed).get_state() for seed in seeds]
    # the thread drew with copies, and the pipeline took its noise instead of drawing
    assert all(
        torch.equal(g.get_state(), state) for g, state in zip(kwargs["generator"], unused, strict=True)
    )
    assert "prepare_latents" not in vars(pipe)  # the class's method again


def test_the_shape_is_what_the_pipeline_draws(pipe: Any) -> None:
    assert noise_shape(pipe, call_kwargs(["a", "b"], [1, 2], size=128, images=3)) == (6, 16, 16, 16)


def test_a_call_asking_for_other_noise_draws_its_own_with_untouched_generators(pipe: Any) -> None:
    drawn = call_kwargs("a red cat", [5])
    called = {**drawn, "width": SIZE * 2}  # not the noise drawn ahead: the pipeline draws with the generators
    expected = generate(pipe, call_kwargs("a red cat", [5], size=SIZE) | {"width": SIZE * 2}, ahead=False)
    with torch.inference_mode(), noise_drawn_ahead(pipe, drawn):
        assert torch.equal(pipe(**called).images, expected)


def test_other_pipelines_draw_their_own_noise() -> None:
    kontext: Any = build_tiny_pipeline("kontext", seed=0)
    with noise_drawn_ahead(kontext, call_kwargs("a red cat", [1])):
        assert "prepare_latents" not in vars(kontext)
