"""Types the engine and the runner share (no Redis, no Celery: the GPU benchmark imports the engine alone)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from shared.schemas import GenerationParams


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    peak_memory_mb: float | None = None
    cached_steps: int = 0


class StepCallback(Protocol):
    def __call__(self, step: int, total: int) -> None: ...


class Engine(Protocol):
    def generate(self, params: GenerationParams, on_step: StepCallback) -> GenerationOutput: ...


class BatchEngine(Engine, Protocol):
    def generate_batch(self, batch: Sequence[GenerationParams], on_step: StepCallback) -> GenerationOutput:
        """One image per job of ``batch`` (jobs that differ only in prompt and seed), in its order."""
        ...
