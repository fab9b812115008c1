"""The worker's runtime options: ``fluxgate worker`` flags, each also a ``FLUXGATE_`` setting."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


class EngineOptions(BaseSettings):
    """Options applied once, when the pipeline is loaded (per-request options come with the job)."""

    model_config = SettingsConfigDict(env_prefix="FLUXGATE_", extra="ignore")

    model_path: str | None = None
    model_name: str | None = None
    device: Device = "auto"
    dtype: DType = "auto"
    warmup: bool = True

    @field_validator("model_path")
    @classmethod
    def _non_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("--model-path must not be empty")
        return value
