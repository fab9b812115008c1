"""Request and response schemas shared by the gateway and the worker (no torch here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["png", "jpeg", "webp"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Fields of the job contract whose behaviour lands with later issues. Until then they are refused with
# 400 `unsupported_parameter`, never silently ignored. (None left: `images` arrived with editing.)
NOT_YET_SUPPORTED_FIELDS: frozenset[str] = frozenset()

EVENT_TYPES: tuple[str, ...] = (
    "job.queued",
    "job.started",
    "job.progress",
    "job.succeeded",
    "job.failed",
    "job.canceled",
    "job.requeued",
)
# Webhooks get every event type but progress unless the job selects its own.
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = tuple(t for t in EVENT_TYPES if t != "job.progress")
Priority = Literal["low", "normal", "high"]


class JobCreate(BaseModel):
    """Body of ``POST /v1/jobs``. Unset fields take the model's defaults; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    output_format: OutputFormat = "png"
    output_quality: int = 90
    cache: str | None = None
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    priority: Priority = "normal"
    cancel_after: float | None = None
    # Reference images for editing: http(s) URLs (fetched by the gateway under the outbound rules) or
    # data URIs. The gateway validates and stores them; the job records ReferenceImage entries.
    images: list[str] | None = None


class ReferenceImage(BaseModel):
    """A reference image as the gateway stored it (an RGB PNG): where it lives and what it is."""

    key: str
    content_type: str = "image/png"
    width: int
    height: int
    sha256: str
    bytes: int


class GenerationParams(BaseModel):
    """Every generation parameter of a job, defaults filled and the seed resolved.

    This is what the worker runs and what the job object echoes as ``params``. Image ``i`` of a
    job is generated from seed ``seed + i``, so each image can be reproduced on its own.
    """

    model: str
    prompt: str
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: OutputFormat
    output_quality: int
    cache: str = "off"
    # Stored reference images (editing); left out of the job object when there are none, so a
    # text-to-image job's params read as before.
    images: list[ReferenceImage] = Field(default_factory=list, exclude_if=lambda images: not images)

    def image_seed(self, index: int) -> int:
        """The seed image ``index`` was generated from (wraps at 2**32)."""
        return (self.seed + index) % 2**32

    def batch_key(self) -> tuple[Any, ...] | None:
        """What jobs run together in one pipeline call share (all but prompt, seed and output encoding);
        None for a job that runs alone: several images, or reference images. The job store's CLAIM script
        applies the same rule (docs/design.md, "Batching")."""
        if self.num_images != 1 or self.images:
            return None
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.cache,
            self.negative_prompt,
            self.true_cfg_scale,
        )


class StoredImage(BaseModel):
    """One result image as recorded by the worker: where it lives, not how to download it."""

    key: str
    content_type: str
    width: int
    height: int
    seed: int
    sha256: str
    bytes: int


class Progress(BaseModel):
    step: int = 0
    total: int = 0


class JobError(BaseModel):
    code: str
    message: str


class JobMetrics(BaseModel):
    queue_s: float | None = None
    inference_s: float | None = None
    upload_s: float | None = None
    peak_memory_mb: float | None = None
    cached_steps: int = 0
    batch_size: int = 1  # how many jobs ran in the one pipeline call that made this job's image


class ImagePublic(BaseModel):
    url: str
    content_type: str
    width: int
    height: int
    seed: int
    sha256: str


class ResultPublic(BaseModel):
    images: list[ImagePublic]
    expires_at: str


class JobPublic(BaseModel):
    """The job object of the HTTP contract (ARCHITECTURE "HTTP contract")."""

    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    attempt: int
    queue_position: int | None = None
    progress: Progress
    params: GenerationParams
    result: ResultPublic | None = None
    error: JobError | None = None
    metrics: JobMetrics | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    next_cursor: str | None = None


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fluxgate"
    capabilities: dict[str, Any]
    live_workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
