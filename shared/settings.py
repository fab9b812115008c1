"""Fluxgate settings: one pydantic-settings object, prefix ``FLUXGATE_``, built by a function.

Nothing reads the environment at import time: call :func:`load_settings` (tests pass overrides).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
DEFAULT_DATA_DIR = ".fluxgate"


class ModelCapabilities(BaseModel):
    """What a configured model can do; the gateway validates requests against it."""

    generate: bool = True
    edit: bool = False
    max_reference_images: int = Field(default=0, ge=0, le=16)
    negative_prompt: bool = False


class ModelDefaults(BaseModel):
    """Generation defaults for a model (FLUX.1-dev's unless the configuration says otherwise)."""

    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5


class ModelConfig(BaseModel):
    """One served model: the API's ``model`` value, its weights and its capabilities."""

    name: str
    path: str
    capabilities: ModelCapabilities = Field(default_factory=ModelCapabilities)
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    # Cache-DiT presets this model's workers configure and warm at start; requests choose one with
    # `cache` ("off" or a name here). Each is a different compiled graph, so the list is fixed.
    cache_presets: list[str] = Field(default_factory=list)
    default_cache: str = "off"

    @field_validator("name")
    @classmethod
    def _name_is_a_queue_name(cls, value: str) -> str:
        if not MODEL_NAME_PATTERN.match(value):
            raise ValueError(f"model name {value!r} must match {MODEL_NAME_PATTERN.pattern}")
        return value

    @model_validator(mode="after")
    def _default_cache_is_offered(self) -> ModelConfig:
        if self.default_cache not in self.cache_choices:
            raise ValueError(
                f"model {self.name!r}: default_cache {self.default_cache!r} is not in {self.cache_choices}"
            )
        return self

    @property
    def cache_choices(self) -> list[str]:
        return ["off", *self.cache_presets]

    @property
    def queue(self) -> str:
        """The Celery queue this model's workers consume."""
        return f"gen.{self.name}"


def tiny_model_config(data_dir: str) -> ModelConfig:
    """The embedded default: the tiny random-weight pipeline ``make run`` builds and serves."""
    return ModelConfig(
        name="flux-tiny",
        path=str(Path(data_dir, "models", "flux-tiny").resolve()),
        defaults=ModelDefaults(width=256, height=256, num_inference_steps=8),
    )


class Limits(BaseModel):
    """Request bounds. Pixels are capped as well as sides: 2048x2048 is 4.19 MP."""

    max_body_bytes: int = 1_048_576
    # Bodies of the routes that carry reference images (POST /v1/jobs with data URIs, POST
    # /v1/images/edits with uploads): room for a 20 MiB image as base64. Everything but the images
    # must still fit max_body_bytes.
    max_image_body_bytes: int = 32 * 1024 * 1024
    max_prompt_chars: int = 4000
    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048
    max_num_images: int = 4
    max_inference_steps: int = 100
    max_guidance_scale: float = 30.0
    max_metadata_bytes: int = 4096
    # Back-pressure: at most this many queued jobs per model; more are refused with 429 and
    # Retry-After instead of growing the queue without bound (0 = no limit).
    max_queued_jobs_per_model: int = Field(default=10_000, ge=0)
    # Quotas per API key / owner, shared by every gateway replica (0 = no limit).
    submissions_per_minute: int = Field(default=600, ge=0)
    max_active_jobs_per_owner: int = Field(default=1000, ge=0)
    queue_full_retry_after_s: int = Field(default=30, ge=1)
    # Reference images (editing), each: encoded bytes (upload, decoded data URI or fetched body), decoded
    # pixels (checked from the header before decoding: decompression bombs), and FLUX.2's own checks
    # (at least 64 px a side, aspect ratio at most 8:1) so that a bad image is a 400, not a failed job.
    max_reference_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_reference_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    min_reference_image_side: int = Field(default=64, ge=1)
    max_reference_image_aspect_ratio: float = Field(default=8.0, ge=1.0)


class Settings(BaseSettings):
    """Every setting of the gateway and the worker. Environment: ``FLUXGATE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLUXGATE_", env_nested_delimiter="__", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: str = DEFAULT_DATA_DIR
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"
    bootstrap_admin_key: str | None = None
    file_signing_key: str | None = None
    models: list[ModelConfig] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)

    result_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Terminal jobs (record, events, deliveries, result and input objects) are purged this long after
    # they ended; at least a day, so idempotency keys (24 h) never point at a purged job.
    retention_s: int = Field(default=7 * 24 * 3600, ge=24 * 3600)
    max_attempts: int = Field(default=3, ge=1, le=10)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    job_time_limit_s: int = Field(default=1800, ge=10)
    redis_retry_after_s: int = 5
    # How long the OpenAI routes wait for their job (queue + run) before canceling it and answering 504;
    # well under the OpenAI SDK's 600 s default timeout, so the client sees our error, not its own.
    openai_timeout_s: float = Field(default=300.0, gt=0, le=3600)
    # Whole fetch of one reference-image URL (connect, request, body), seconds.
    reference_fetch_timeout_s: float = Field(default=15.0, gt=0, le=120)

    # Webhooks and outbound requests (docs/webhooks.md).
    # CIDRs outbound requests may reach despite being private/loopback, comma list (e.g. 127.0.0.0/8).
    outbound_allow_cidrs: str = ""
    # How long a rotated-out webhook secret still signs deliveries (both signatures are sent meanwhile).
    webhook_secret_overlap_s: int = Field(default=86400, ge=0, le=30 * 86400)
    # Delay before each webhook retry, seconds, comma list; attempts = 1 + entries (default ~15 h in all).
    webhook_retry_schedule_s: str = "5,30,120,600,1800,3600,7200,14400,28800"
    # Fraction of each retry delay drawn at random (1.0 = full jitter, 0 = none).
    webhook_retry_jitter: float = Field(default=0.5, ge=0, le=1)
    # Seconds to connect to a webhook receiver.
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Seconds for a whole webhook attempt (connect, send, response), enforced by a watchdog.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # At most one job.progress delivery per job per this many seconds; the ones between are dropped.
    webhook_progress_interval_s: float = Field(default=2.0, ge=0)
    # Delivery threads of one `fluxgate webhooks` process.
    webhook_concurrency: int = Field(default=4, ge=1, le=64)
    # Port of each worker process's Prometheus endpoint (0 = none). Two workers on one host need two ports.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    # "json": one JSON object per log line (with job_id inside a job); "text" for people.
    log_format: Literal["text", "json"] = "text"

    @field_validator("outbound_allow_cidrs")
    @classmethod
    def _cidrs_are_cidrs(cls, value: str) -> str:
        from shared.outbound import parse_allow_cidrs

        parse_allow_cidrs(value)
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _schedule_is_seconds(cls, value: str) -> str:
        from shared.webhook_retry import parse_schedule

        parse_schedule(value)
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data_dir = Path(self.data_dir).resolve()
        self.data_dir = str(data_dir)
        if not self.storage_url:
            self.storage_url = f"file://{data_dir / 'files'}"
        if not self.models:
            self.models = [tiny_model_config(self.data_dir)]
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"FLUXGATE_MODELS names must be unique, got {names}")
        if not self.storage_url.startswith(("file://", "s3://")):
            raise ValueError("FLUXGATE_STORAGE_URL must start with file:// or s3://")
        if self.result_url_ttl_s >= self.retention_s:
            raise ValueError("FLUXGATE_RESULT_URL_TTL_S must be shorter than FLUXGATE_RETENTION_S")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("FLUXGATE_HEARTBEAT_TIMEOUT_S must exceed FLUXGATE_HEARTBEAT_INTERVAL_S")
        return self

    def model(self, name: str) -> ModelConfig | None:
        """The configured model called ``name``, or None."""
        return next((model for model in self.models if model.name == name), None)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, with explicit overrides winning."""
    return Settings(**overrides)
