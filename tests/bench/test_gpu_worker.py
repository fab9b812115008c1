"""The GPU benchmark worker's loader, on the tiny model (``--smoke``): built, checked, warmed, generating."""

from __future__ import annotations

from bench.gpu_worker import random_weights_loader
from shared.settings import ModelConfig, ModelDefaults
from tests.support import generation_params
from worker.options import EngineOptions


def test_the_smoke_loader_builds_warms_and_serves_the_tiny_model() -> None:
    model = ModelConfig(
        name="flux-tiny-random",
        path="random-weights:tiny",
        defaults=ModelDefaults(width=64, height=64, num_inference_steps=2),
    )
    options = EngineOptions(device="cpu", warmup_resolutions="64x64")
    engine = random_weights_loader(smoke=True)(model, options, {})
    assert engine.pipeline_class == "FluxPipeline" and engine.device.type == "cpu"
    steps: list[int] = []
    params = generation_params(width=64, height=64, num_inference_steps=2)
    output = engine.generate(params, lambda step, total: steps.append(step))
    assert steps == [1, 2] and output.images[0].size == (64, 64)
