"""The FLUX engine: one diffusers pipeline loaded once per process, run per job."""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import torch
from diffusers import DiffusionPipeline

from shared.schemas import GenerationParams
from worker.options import EngineOptions
from worker.runner import GenerationOutput, StepCallback

log = logging.getLogger("fluxgate.engine")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if option == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(option)


def resolve_dtype(option: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (FLUX's native precision); fp32 on CPUs, where bf16 matmuls are slow."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[option]


class FluxEngine:
    """A warm FLUX pipeline. ``from_pretrained`` picks the class from ``model_index.json``."""

    def __init__(self, pipeline: Any, device: torch.device) -> None:
        self.pipeline = pipeline
        self.device = device

    @classmethod
    def load(cls, model_path: str, options: EngineOptions) -> FluxEngine:
        """Load the pipeline from a hub id or a local directory onto the configured device."""
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        started = time.perf_counter()
        pipeline = DiffusionPipeline.from_pretrained(model_path, dtype=dtype)
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        log.info(
            "loaded %s from %s on %s in %.1fs",
            type(pipeline).__name__,
            model_path,
            device,
            time.perf_counter() - started,
        )
        return cls(pipeline, device)

    @property
    def pipeline_class(self) -> str:
        return type(self.pipeline).__name__

    def warmup(self) -> None:
        """One small generation, so that the first user request pays no first-call costs."""
        params = GenerationParams(
            model="warmup",
            prompt="warm-up",
            width=256,
            height=256,
            num_inference_steps=2,
            guidance_scale=3.5,
            seed=0,
            num_images=1,
            output_format="png",
            output_quality=90,
        )
        self.generate(params, lambda step, total: None)

    def generate(self, params: GenerationParams, on_step: StepCallback) -> GenerationOutput:
        """Run one job. Image ``i`` uses its own CPU generator seeded ``seed + i`` (device-independent)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        generators = [
            torch.Generator(device="cpu").manual_seed(params.image_seed(i)) for i in range(params.num_images)
        ]
        total = params.num_inference_steps

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, total)
            return tensors

        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": total,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.num_images,
            "generator": generators,
            "output_type": "pil",
            "callback_on_step_end": step_end,
        }
        if params.negative_prompt is not None:
            kwargs["negative_prompt"] = params.negative_prompt
        if params.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = params.true_cfg_scale
        with torch.inference_mode():
            images = self.pipeline(**kwargs).images
        return GenerationOutput(images=list(images), peak_memory_mb=self._peak_memory_mb())

    def _peak_memory_mb(self) -> float:
        """Peak GPU memory of this job on CUDA; on a CPU, the process's peak resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
