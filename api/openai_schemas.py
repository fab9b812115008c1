"""The OpenAI Images API's request and response shapes, and how a request maps onto a native job.

A request becomes a :class:`shared.schemas.JobCreate` and goes through the same validation, queue and
workers as ``POST /v1/jobs``. OpenAI's names map onto the job's: ``n`` → ``num_images``, ``size`` →
``width`` x ``height``, ``output_compression`` → ``output_quality``, ``user`` and
``safety_identifier`` → ``metadata``; errors
that the job's validation reports under its own names are renamed back (:func:`openai_param`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.errors import ApiError, invalid
from shared.schemas import JobCreate, OutputFormat
from shared.settings import Limits, ModelConfig, Settings

ResponseFormat = Literal["b64_json", "url"]
# Accepted so the SDK's values pass; FLUX runs the same whatever the value (docs/design.md says why).
Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
OPENAI_MAX_N = 10
MAX_USER_CHARS = 256
SIZE_PATTERN = re.compile(r"(\d{1,5})x(\d{1,5})")
# Job parameter -> the OpenAI request field it came from.
RENAMED_PARAMS = {"num_images": "n", "output_quality": "output_compression"}


class ImageRequest(BaseModel):
    """Fields of ``POST /v1/images/generations`` (JSON) and ``/v1/images/edits`` (multipart form)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    n: int | None = None
    size: str | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = None
    quality: Quality | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # OpenAI fields accepted at the values FLUX can honour: opaque images, no streaming.
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool | None = None
    # FLUX fields (negative_prompt / true_cfg_scale only for models configured with negative_prompt).
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None


class ImageData(BaseModel):
    """One image of the response, as the SDK's ``openai.types.Image`` reads it."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The response body, as the SDK's ``openai.types.ImagesResponse`` reads it."""

    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: Quality
    size: str


def check_openai_fields(request: ImageRequest, limits: Limits) -> None:
    """What OpenAI bounds differently from the job, or FLUX cannot do; each a 400 naming the field."""
    n = request.n if request.n is not None else 1
    cap = min(OPENAI_MAX_N, limits.max_num_images)
    if not 1 <= n <= cap:
        raise invalid("n", f"n must be between 1 and {cap}, got {n}.")
    if request.output_compression is not None and not 0 <= request.output_compression <= 100:
        raise invalid("output_compression", "output_compression must be between 0 and 100.")
    for param in ("user", "safety_identifier"):
        value = getattr(request, param)
        if value is not None and len(value) > MAX_USER_CHARS:
            raise invalid(param, f"{param} must be at most {MAX_USER_CHARS} characters.")
    if request.stream:
        raise ApiError(400, "unsupported_parameter", "Streaming (stream=true) is not supported.", "stream")


def requested_size(request: ImageRequest) -> tuple[int | None, int | None]:
    """``size`` ("WxH" or "auto") merged with ``width`` / ``height``; None where the model decides."""
    if request.size is None or request.size.strip().lower() == "auto":
        return request.width, request.height
    match = SIZE_PATTERN.fullmatch(request.size.strip().lower())
    if match is None:
        raise invalid("size", "size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto'.", "invalid_size")
    width, height = int(match[1]), int(match[2])
    if request.width not in (None, width) or request.height not in (None, height):
        raise invalid("size", f"size {request.size} disagrees with width/height.", "invalid_size")
    return width, height


def auto_edit_size(reference: tuple[int, int], model: ModelConfig, limits: Limits) -> tuple[int, int]:
    """Edits with ``size=auto``: the model's default area at the first reference image's aspect ratio,
    in multiples of 16 within the size limits."""
    aspect = reference[0] / reference[1]
    area = model.defaults.width * model.defaults.height
    width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    scale = min(1.0, limits.max_side / max(width, height), math.sqrt(limits.max_pixels / (width * height)))

    def snap(side: float) -> int:
        return int(min(max(round(side * scale / 16) * 16, limits.min_side), limits.max_side))

    return snap(width), snap(height)


def to_job_create(
    request: ImageRequest, size: tuple[int | None, int | None], endpoint: str, settings: Settings
) -> JobCreate:
    """The native job for an OpenAI request; its deadline is the OpenAI wait (``openai_timeout_s``)."""
    metadata: dict[str, Any] = {"openai_endpoint": endpoint}
    if request.user:
        metadata["user"] = request.user
    if request.safety_identifier:
        metadata["safety_identifier"] = request.safety_identifier
    optional: dict[str, Any] = {
        "negative_prompt": request.negative_prompt,
        "true_cfg_scale": request.true_cfg_scale,
        "width": size[0],
        "height": size[1],
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "output_format": request.output_format,
        # OpenAI allows 0-100; the encoders' quality scale starts at 1.
        "output_quality": None if request.output_compression is None else max(1, request.output_compression),
    }
    return JobCreate(
        model=request.model,
        prompt=request.prompt,
        num_images=request.n or 1,
        metadata=metadata,
        cancel_after=settings.openai_timeout_s,
        **{name: value for name, value in optional.items() if value is not None},
    )


def openai_param(error: ApiError, size_given: bool) -> ApiError:
    """Name the OpenAI field in an error the job's validation raised under the job's field name."""
    if error.param in RENAMED_PARAMS:
        error.param = RENAMED_PARAMS[error.param]
    elif error.param in ("width", "height") and size_given:
        error.param = "size"
    return error
