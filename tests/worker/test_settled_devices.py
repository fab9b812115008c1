"""diffusers' device lookups answered once per component: the same answers and images, no module walks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.hooks import group_offloading
from diffusers.pipelines.flux import pipeline_flux

from worker.engine import FluxEngine, internal_params
from worker.optimizations.settled_devices import module_execution_device, settle_devices
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts diffusers' walks over a component's modules (its group-offload hook search)."""
    counted: list[int] = []
    search = group_offloading._get_top_level_group_offload_hook

    def counting(module: torch.nn.Module) -> Any:
        counted.append(1)
        return search(module)

    monkeypatch.setattr(group_offloading, "_get_top_level_group_offload_hook", counting)
    return counted


def test_settled_lookups_give_diffusers_answers_without_walking_the_modules(walks: list[int]) -> None:
    pipe: Any = build_tiny_pipeline("flux1", seed=0)
    expected = pipe._execution_device
    parts = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    expected_parts = [pipeline_flux.get_module_execution_device(part) for part in parts]
    settle_devices(pipe)
    walks.clear()
    assert pipe._execution_device == expected
    assert [pipeline_flux.get_module_execution_device(part) for part in parts] == expected_parts
    assert walks == []


def test_unsettled_pipelines_and_modules_keep_diffusers_lookups(walks: list[int]) -> None:
    settled: Any = build_tiny_pipeline("flux1", seed=0)
    settle_devices(settled)
    other: Any = build_tiny_pipeline("flux1", seed=1)
    walks.clear()
    assert other._execution_device == CPU
    assert walks, "another pipeline's lookup walks its modules, as diffusers does"
    walks.clear()
    assert module_execution_device(torch.nn.Linear(2, 2)) == CPU and walks
    with pytest.raises(AttributeError):
        module_execution_device(None)  # what diffusers raises for a missing component


def test_an_engine_settles_its_pipeline_and_draws_the_same_image(walks: list[int]) -> None:
    params = internal_params(64, 64, 2, "off", prompt="a red cube")
    plain: Any = build_tiny_pipeline("flux1", seed=0)
    plain.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        expected = plain(
            prompt=params.prompt,
            width=64,
            height=64,
            num_inference_steps=2,
            guidance_scale=params.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(params.image_seed(0)),
        ).images[0]
    engine = FluxEngine.from_pipeline(build_tiny_pipeline("flux1", seed=0), EngineOptions(), CPU)
    walks.clear()
    image = engine.generate(params, lambda step, total: None).images[0]
    assert walks == []
    assert image.tobytes() == expected.tobytes()
