"""The OpenAI Images API over the job queue: each request is a native job, awaited until it ends.

``openai.OpenAI(base_url=".../v1").images.generate(...)`` and ``.images.edit(...)`` work unchanged;
``GET /v1/models`` (api/routes/models.py) already has the list shape ``models.list()`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentPrincipal, ServicesDep
from api.image_checks import DecodedImage, decode_image
from api.openai_forms import EditForm, parse_fields, read_edit_form
from api.openai_jobs import ClientDisconnected, check_succeeded, images_response, wait_for_job
from api.openai_schemas import (
    ImageRequest,
    ImagesResponse,
    auto_edit_size,
    check_openai_fields,
    openai_param,
    requested_size,
    to_job_create,
)
from api.references import check_reference_count
from api.routes.jobs import MAX_IDEMPOTENCY_KEY_CHARS
from api.services import Services
from api.submission import submit_job
from api.validation import resolve_model
from shared.errors import ApiError
from shared.keys import Principal
from shared.schemas import JobCreate
from shared.settings import Limits, ModelConfig, Settings

router = APIRouter(prefix="/v1", tags=["openai"])

IdempotencyKey = Annotated[str | None, Header()]


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def create_images(
    body: ImageRequest,
    request: Request,
    principal: CurrentPrincipal,
    services: ServicesDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    """Generate images (OpenAI ``images.generate``): a job on the model's queue, awaited."""
    check_openai_fields(body, services.settings.limits)
    job = to_job_create(body, requested_size(body), "images/generations", services.settings)
    return await _run(services, principal, request, response, body, job, idempotency_key)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edit_images(
    request: Request,
    principal: CurrentPrincipal,
    services: ServicesDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse:
    """Edit images (OpenAI ``images.edit``): multipart reference images and a prompt, a job awaited."""
    settings = services.settings
    form = await read_edit_form(request, settings.limits.max_reference_image_bytes)
    body = parse_fields(form)
    check_openai_fields(body, settings.limits)
    model = _edit_model(settings, body.model)
    body = body.model_copy(update={"model": model.name})
    if not form.images:
        raise ApiError(400, "missing_parameter", "Missing required parameter: image.", "image")
    check_reference_count(model, len(form.images), "image")
    uploads = await run_in_threadpool(_decode_uploads, form, settings.limits)
    size = requested_size(body)
    if size == (None, None):
        size = auto_edit_size((uploads[0].width, uploads[0].height), model, settings.limits)
    job = to_job_create(body, size, "images/edits", settings)
    return await _run(services, principal, request, response, body, job, idempotency_key, uploads)


def _edit_model(settings: Settings, name: str | None) -> ModelConfig:
    """The requested model; by default the first configured model that edits (else the first one)."""
    if name is None:
        name = next((model.name for model in settings.models if model.capabilities.edit), None)
    return resolve_model(settings, name)


def _decode_uploads(form: EditForm, limits: Limits) -> list[DecodedImage]:
    several = len(form.images) > 1
    return [
        decode_image(data, f"image[{index}]" if several else "image", "image", limits)
        for index, (_, data) in enumerate(form.images)
    ]


async def _run(
    services: Services,
    principal: Principal,
    request: Request,
    response: Response,
    body: ImageRequest,
    job: JobCreate,
    idempotency_key: str | None,
    uploads: Sequence[DecodedImage] = (),
) -> ImagesResponse:
    """Submit the job (idempotently), wait for it, and answer with its images or an OpenAI error."""
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise ApiError(
            400, "invalid_parameter", "Idempotency-Key must be 1 to 255 characters.", "Idempotency-Key"
        )
    try:
        submission = await run_in_threadpool(submit_job, services, principal, job, idempotency_key, uploads)
    except ApiError as error:
        raise openai_param(error, size_given=(body.size or "auto").strip().lower() != "auto") from None
    job_id = submission.record.id
    response.headers["X-Fluxgate-Job-Id"] = job_id
    timeout_s = services.settings.openai_timeout_s
    try:
        finished = await wait_for_job(services, submission.record, timeout_s, request.is_disconnected)
        check_succeeded(finished, timeout_s)
        return await images_response(
            services, finished, body.response_format or "b64_json", body.quality or "auto"
        )
    except ClientDisconnected:  # nobody reads this answer; the status shows in logs and metrics
        raise ApiError(499, "client_disconnected", "The client disconnected; its job was canceled.") from None
    except ApiError as error:
        error.headers.setdefault("X-Fluxgate-Job-Id", job_id)
        raise
