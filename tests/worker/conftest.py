"""Worker tests' shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from diffusers.models.attention_dispatch import _AttentionBackendRegistry


@pytest.fixture(autouse=True)
def diffusers_attention_backend_restored() -> Iterator[None]:
    """diffusers' ``set_attention_backend`` also sets a process-wide active backend, which every processor
    without a backend of its own then dispatches through: each test leaves the one it found."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)
