"""Optional GPU kernels' availability checks, seen from the CPU: a pretended Hopper GPU, a failing trial."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

from worker import engine as engine_module
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline


def pretend_hopper_with_packages(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
    """``module``'s check sees a Hopper GPU (sm_90) and finds every package it looks for."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: object())


def failing_trial(error: Exception) -> Callable[[torch.device], None]:
    """A trial call that raises ``error``: a broken install or a kernel the driver cannot build."""

    def trial(device: torch.device) -> None:
        raise error

    return trial


def compiled_engine_transformer(monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    """The tiny FLUX.1 pipeline's transformer as the ``--compile`` engine prepares it on the CPU (``options``
    added), the regional compile itself left out (no CPU compile here)."""
    monkeypatch.setattr(engine_module, "apply_regional_compile", lambda *args: None)
    pipe = build_tiny_pipeline("flux1", seed=0).to(torch.bfloat16)
    settings = EngineOptions(compile=True, compile_vae=False, cuda_graphs=False, **options)
    engine_module.FluxEngine.from_pipeline(pipe, settings, torch.device("cpu"))
    return pipe.transformer


def compiled_engine_vae_decoder(monkeypatch: pytest.MonkeyPatch, **options: Any) -> Any:
    """The tiny FLUX.1 pipeline's VAE decoder as the ``--compile`` engine prepares it on the CPU (``options``
    added; the decoder compiled when first called, which these tests do not)."""
    monkeypatch.setattr(engine_module, "apply_regional_compile", lambda *args: None)
    pipe = build_tiny_pipeline("flux1", seed=0)
    settings = EngineOptions(compile=True, compile_vae=True, cuda_graphs=False, **options)
    engine_module.FluxEngine.from_pipeline(pipe, settings, torch.device("cpu"))
    return pipe.vae.decoder
