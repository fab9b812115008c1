"""Trial calls of optional kernels at load: a broken install costs the worker the kernel, not a job."""

from __future__ import annotations

from collections.abc import Callable

import torch


def trial_failure(name: str, trial: Callable[[torch.device], None], device: torch.device) -> str | None:
    """Why ``trial`` (one small call of ``name``'s kernel) failed on ``device``; ``None`` when it ran."""
    try:
        trial(device)
    except Exception as error:  # a broken install, or a kernel this GPU or driver cannot build or run
        return f"{name}'s trial call failed: {type(error).__name__}: {str(error)[:300]}"
    return None
