"""``POST /v1/images/edits``: the multipart form, read within bounds, as fields and image uploads.

The OpenAI SDK sends one image as the file part ``image`` and a list as ``image[]`` parts; ``image[0]``
style indices are accepted too. Every other part is a plain field, validated like the JSON body of
``/v1/images/generations``. Each problem is a 400 naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from api.openai_schemas import ImageRequest
from shared.errors import ApiError, invalid

IMAGE_PART = re.compile(r"image(\[\d*\])?")
# A bound on parts before any model's limit is known: 16 reference images (the most a model may be
# configured with) and a mask.
MAX_FORM_FILES = 17
MAX_FORM_FIELDS = 64
# Plain fields only (files are bounded by the body limit and max_reference_image_bytes): a prompt of
# 4000 characters is at most 16 KB of UTF-8.
MAX_FIELD_BYTES = 64 * 1024


@dataclass
class EditForm:
    """The form's plain fields, and each uploaded image as (its part name, its bytes)."""

    fields: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, bytes]] = field(default_factory=list)


async def read_edit_form(request: Request, max_image_bytes: int) -> EditForm:
    """Parse the multipart body; files beyond ``max_image_bytes`` are refused without reading them whole."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(
            400,
            "invalid_content_type",
            "POST /v1/images/edits takes multipart/form-data: image file parts and plain fields.",
        )
    form = EditForm()
    try:
        async with request.form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        ) as parsed:
            for name, value in parsed.multi_items():
                if isinstance(value, UploadFile):
                    form.images.append((name, await _read_upload(name, value, max_image_bytes)))
                else:
                    _add_field(form, name, value)
    except HTTPException as error:  # Starlette's multipart parser: malformed, too many parts, ...
        raise ApiError(
            400, "invalid_multipart", f"The multipart body could not be read: {error.detail}"
        ) from None
    return form


async def _read_upload(name: str, upload: UploadFile, max_bytes: int) -> bytes:
    if name == "mask":
        raise ApiError(
            400,
            "unsupported_parameter",
            "mask is not supported: none of the served pipelines (FLUX.1, FLUX.1 Kontext, FLUX.2) "
            "inpaints with a mask; describe the edit in the prompt instead.",
            "mask",
        )
    if not IMAGE_PART.fullmatch(name):
        raise invalid(name, f"{name} must be a plain form field, not a file.", "unknown_parameter")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise invalid(
            name, f"{name} ({upload.filename}) is larger than {max_bytes} bytes.", "image_too_large"
        )
    return data


def _add_field(form: EditForm, name: str, value: str) -> None:
    if IMAGE_PART.fullmatch(name) or name == "mask":
        raise invalid(name, f"{name} must be an uploaded file (a multipart file part).", "invalid_image")
    if name in form.fields:
        raise invalid(name, f"{name} was given more than once.")
    form.fields[name] = value


def parse_fields(form: EditForm) -> ImageRequest:
    """The plain fields as an :class:`ImageRequest` (strings coerced); errors are 400 naming the field."""
    try:
        return ImageRequest.model_validate(form.fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
