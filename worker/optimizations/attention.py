"""Attention backend dispatch through diffusers (``--attention-backend``)."""

from __future__ import annotations

from typing import Any

from diffusers.models.attention_dispatch import AttentionBackendName


class AttentionBackendError(ValueError):
    """The backend is unknown or cannot run here; the message names ``--attention-backend``."""


def backend_names() -> list[str]:
    return [backend.value for backend in AttentionBackendName]


def apply_attention_backend(pipe: Any, backend: str) -> None:
    """Route the transformer's attention through ``backend`` (e.g. ``_native_cudnn``, ``flash``, ``sage``).

    diffusers checks the backend's package and device requirements here, at load time, so a worker
    with a missing kernel fails at start instead of on a user's request. The backend is set on the
    transformer itself (diffusers also keeps a process-wide default, which per-transformer settings
    override).
    """
    name = backend.lower()
    if name not in backend_names():
        choices = ", ".join(backend_names())
        raise AttentionBackendError(
            f"--attention-backend {backend!r} is not a diffusers backend; choose one of: {choices}"
        )
    try:
        pipe.transformer.set_attention_backend(name)
    except (ImportError, RuntimeError, ValueError) as error:
        raise AttentionBackendError(f"--attention-backend {backend!r} cannot run here: {error}") from error
