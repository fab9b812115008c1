"""Turns a validated request body into the job's full generation parameters, or a 400 naming the field."""

from __future__ import annotations

import json
import secrets

from shared.errors import ApiError, invalid
from shared.outbound import OutboundPolicy, OutboundRefused
from shared.schemas import EVENT_TYPES, GenerationParams, JobCreate
from shared.settings import Limits, ModelConfig, Settings

MAX_SEED = 2**32


def resolve_model(settings: Settings, name: str | None) -> ModelConfig:
    """The requested model (default: the first configured); 404 ``model_not_found`` if unknown."""
    if name is None:
        return settings.models[0]
    model = settings.model(name)
    if model is None:
        raise ApiError(404, "model_not_found", f"The model {name!r} does not exist.", param="model")
    return model


def _bounded(param: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise invalid(param, f"{param} must be between {low} and {high}, got {value}.")


def _check_size(width: int, height: int, limits: Limits) -> None:
    for param, side in (("width", width), ("height", height)):
        _bounded(param, side, limits.min_side, limits.max_side)
        if side % 16:
            raise invalid(param, f"{param} must be a multiple of 16, got {side}.", code="invalid_size")
    if width * height > limits.max_pixels:
        megapixels = limits.max_pixels / 1e6
        raise invalid("width", f"width x height must be at most {megapixels:.2f} megapixels.", "invalid_size")


def _check_prompt(param: str, prompt: str, limits: Limits) -> str:
    text = prompt.strip()
    if not text and param == "prompt":
        raise invalid(param, "prompt must not be empty.")
    if len(text) > limits.max_prompt_chars:
        raise invalid(
            param, f"{param} must be at most {limits.max_prompt_chars} characters, got {len(text)}."
        )
    return text


def _check_negative_prompt(body: JobCreate, model: ModelConfig) -> None:
    for param in ("negative_prompt", "true_cfg_scale"):
        if getattr(body, param) is not None and not model.capabilities.negative_prompt:
            raise ApiError(
                400, "unsupported_parameter", f"The model {model.name!r} does not support {param}.", param
            )


def check_metadata(metadata: dict[str, object] | None, limits: Limits) -> None:
    """Metadata is echoed back on the job, so its JSON size is bounded."""
    if metadata is not None and len(json.dumps(metadata)) > limits.max_metadata_bytes:
        raise invalid("metadata", f"metadata must be at most {limits.max_metadata_bytes} bytes of JSON.")


def _resolve_cache(body: JobCreate, model: ModelConfig) -> str:
    cache = body.cache if body.cache is not None else model.default_cache
    if cache not in model.cache_choices:
        raise invalid("cache", f"cache must be one of {model.cache_choices} for the model {model.name!r}.")
    return cache


def _check_scalars(body: JobCreate, steps: int, guidance: float, limits: Limits) -> None:
    _bounded("num_inference_steps", steps, 1, limits.max_inference_steps)
    _bounded("guidance_scale", guidance, 0, limits.max_guidance_scale)
    if body.true_cfg_scale is not None:
        _bounded("true_cfg_scale", body.true_cfg_scale, 1, limits.max_guidance_scale)
    _bounded("num_images", body.num_images, 1, limits.max_num_images)
    _bounded("output_quality", body.output_quality, 1, 100)
    if body.seed is not None:
        _bounded("seed", body.seed, 0, MAX_SEED - 1)


def resolve_params(body: JobCreate, model: ModelConfig, limits: Limits) -> GenerationParams:
    """Every generation parameter, defaults from the model filled in and the seed drawn if unset."""
    if not model.capabilities.generate:
        raise ApiError(
            400, "unsupported_model", f"The model {model.name!r} does not generate images.", "model"
        )
    _check_negative_prompt(body, model)
    defaults = model.defaults
    width = body.width if body.width is not None else defaults.width
    height = body.height if body.height is not None else defaults.height
    _check_size(width, height, limits)
    steps = body.num_inference_steps if body.num_inference_steps is not None else defaults.num_inference_steps
    guidance = body.guidance_scale if body.guidance_scale is not None else defaults.guidance_scale
    _check_scalars(body, steps, guidance, limits)
    negative = (
        _check_prompt("negative_prompt", body.negative_prompt, limits) if body.negative_prompt else None
    )
    return GenerationParams(
        model=model.name,
        prompt=_check_prompt("prompt", body.prompt, limits),
        negative_prompt=negative,
        true_cfg_scale=body.true_cfg_scale,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=body.seed if body.seed is not None else secrets.randbelow(MAX_SEED),
        num_images=body.num_images,
        output_format=body.output_format,
        output_quality=body.output_quality,
        cache=_resolve_cache(body, model),
    )


MAX_CANCEL_AFTER_S = 7 * 24 * 3600
MAX_WEBHOOK_URL_CHARS = 2048


def check_job_options(body: JobCreate, settings: Settings) -> None:
    """Deadline, webhook URL and event selection."""
    if body.cancel_after is not None:
        _bounded("cancel_after", body.cancel_after, 0.001, MAX_CANCEL_AFTER_S)
    if body.webhook_events is not None:
        if body.webhook_url is None:
            raise invalid("webhook_events", "webhook_events needs a webhook_url.")
        unknown = sorted(set(body.webhook_events) - set(EVENT_TYPES))
        if unknown or not body.webhook_events:
            raise invalid(
                "webhook_events", f"webhook_events must be a non-empty list of {list(EVENT_TYPES)}."
            )
    if body.webhook_url is not None:
        check_webhook_url(body.webhook_url, settings)


def check_webhook_url(url: str, settings: Settings) -> None:
    """http(s) only, bounded, and never to private, loopback, link-local or metadata addresses."""
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise invalid("webhook_url", f"webhook_url must be at most {MAX_WEBHOOK_URL_CHARS} characters.")
    try:
        OutboundPolicy.from_setting(settings.outbound_allow_cidrs).check_url(url)
    except OutboundRefused as error:
        raise invalid("webhook_url", f"webhook_url refused: {error}") from None
