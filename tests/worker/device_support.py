"""Optional GPU kernels' availability checks, seen from the CPU: a pretended Hopper GPU, a failing trial."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch


def pretend_hopper_with_packages(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> None:
    """``module``'s check sees a Hopper GPU (sm_90) and finds every package it looks for."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: object())


def failing_trial(error: Exception) -> Callable[[torch.device], None]:
    """A trial call that raises ``error``: a broken install or a kernel the driver cannot build."""

    def trial(device: torch.device) -> None:
        raise error

    return trial
