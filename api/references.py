"""Reference images for editing, handled entirely at the gateway: read, checked, normalized, stored.

Sources are http(s) URLs (fetched through :mod:`shared.outbound_http`: vetted addresses, no redirects,
bounded bytes and time), data URIs (base64), and multipart uploads (``POST /v1/images/edits``). Each
is decoded under the ``Limits`` of :mod:`api.image_checks`, re-encoded as an RGB PNG and stored at
``inputs/{job_id}/{index}.png`` in the result storage; the job's params record key, sha256 and size,
so workers read them from storage and never need outbound network access.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from api.image_checks import DecodedImage, decode_image
from shared import outbound_http
from shared.errors import ApiError, invalid
from shared.outbound import OutboundPolicy, OutboundRefused
from shared.schemas import ReferenceImage
from shared.settings import ModelConfig, Settings
from shared.storage import Storage, StorageError

MAX_CONCURRENT_FETCHES = 8


@dataclass(frozen=True)
class ReferenceSource:
    """One reference image as the request gave it: a URL or data URI, named for error messages."""

    label: str  # e.g. "images[1]", as the message names it
    param: str  # the request field, as the error's `param` names it
    value: str


def check_reference_count(model: ModelConfig, count: int, param: str) -> None:
    """A model without ``edit`` takes none; others at most ``capabilities.max_reference_images``."""
    if count == 0:
        return
    capabilities = model.capabilities
    if not capabilities.edit:
        raise ApiError(
            400,
            "unsupported_parameter",
            f"The model {model.name!r} does not edit images, so it takes no {param}.",
            param,
        )
    if count > capabilities.max_reference_images:
        raise invalid(
            param,
            f"The model {model.name!r} takes at most {capabilities.max_reference_images} reference "
            f"image(s), got {count}.",
            code="too_many_images",
        )


def load_references(sources: Sequence[str], model: ModelConfig, settings: Settings) -> list[DecodedImage]:
    """The native ``images`` field: each URL fetched or data URI decoded, then checked (400 naming it)."""
    check_reference_count(model, len(sources), "images")
    labelled = [ReferenceSource(f"images[{i}]", "images", value) for i, value in enumerate(sources)]
    return decode_all(labelled, lambda source: read_source(source, settings), settings)


def decode_all(
    sources: Sequence[ReferenceSource], read: Callable[[ReferenceSource], bytes], settings: Settings
) -> list[DecodedImage]:
    """Read and decode every source, several at once; the first failure (in order) is raised."""

    def one(source: ReferenceSource) -> DecodedImage:
        return decode_image(read(source), source.label, source.param, settings.limits)

    if len(sources) <= 1:
        return [one(source) for source in sources]
    pool = ThreadPoolExecutor(max_workers=min(len(sources), MAX_CONCURRENT_FETCHES))
    try:
        return list(pool.map(one, sources))
    finally:  # after a failure, the rest are not waited for (each fetch is bounded by its own timeout)
        pool.shutdown(wait=False, cancel_futures=True)


def read_source(source: ReferenceSource, settings: Settings) -> bytes:
    """The encoded bytes of a data URI or an http(s) URL; anything else is a 400."""
    value = source.value.strip()
    if value[:5].lower() == "data:":
        return read_data_uri(source, value, settings.limits.max_reference_image_bytes)
    if value[:8].lower() == "https://" or value[:7].lower() == "http://":
        return fetch_url(source, value, settings)
    raise invalid(source.param, f"{source.label} must be an http(s) URL or a data URI.", "invalid_image")


def read_data_uri(source: ReferenceSource, uri: str, max_bytes: int) -> bytes:
    """``data:image/png;base64,...`` → bytes; the size is checked before decoding."""
    header, comma, payload = uri[5:].partition(",")
    parts = [part.strip().lower() for part in header.split(";")]
    if not comma or parts[-1] != "base64" or not (parts[0] == "" or parts[0].startswith("image/")):
        raise invalid(
            source.param,
            f"{source.label} must be a base64 data URI: data:image/<type>;base64,<data>.",
            "invalid_image",
        )
    # Refuse before decoding: base64 is 4 characters per 3 bytes, plus slack for line breaks (MIME wraps
    # at 76 characters); the exact size is checked after decoding.
    if len(payload) > (max_bytes // 3 + 1) * 4 * 1.05 + 1024:
        raise _too_large(source, max_bytes)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(source.param, f"{source.label} is not valid base64.", "invalid_image") from None
    if len(data) > max_bytes:
        raise _too_large(source, max_bytes)
    return data


def fetch_url(source: ReferenceSource, url: str, settings: Settings) -> bytes:
    """GET ``url`` under the outbound rules, bounded in bytes and time; problems are 400 naming the field."""
    max_bytes = settings.limits.max_reference_image_bytes
    total = settings.reference_fetch_timeout_s
    timeouts = outbound_http.Timeouts(connect_s=min(5.0, total), total_s=total)
    policy = OutboundPolicy.from_setting(settings.outbound_allow_cidrs)
    try:
        response = outbound_http.request(
            policy, "GET", url, None, {"Accept": "image/*"}, timeouts, max_response_bytes=max_bytes + 1
        )
    except OutboundRefused as error:
        raise invalid(source.param, f"{source.label} refused: {error}", "url_refused") from None
    except outbound_http.OutboundError as error:
        raise invalid(
            source.param, f"{source.label} could not be fetched: {error}", "image_fetch_failed"
        ) from None
    if response.status != 200:
        detail = " (redirects are not followed)" if 300 <= response.status < 400 else ""
        raise invalid(
            source.param,
            f"{source.label} could not be fetched: the server answered HTTP {response.status}{detail}.",
            "image_fetch_failed",
        )
    if len(response.body) > max_bytes:
        raise _too_large(source, max_bytes)
    return response.body


def _too_large(source: ReferenceSource, max_bytes: int) -> ApiError:
    return invalid(source.param, f"{source.label} is larger than {max_bytes} bytes.", "image_too_large")


def store_references(storage: Storage, job_id: str, images: Sequence[DecodedImage]) -> list[ReferenceImage]:
    """Put each normalized image at ``inputs/{job_id}/{index}.png``; 503 if storage fails."""
    stored = []
    for index, image in enumerate(images):
        key = f"inputs/{job_id}/{index}.png"
        try:
            storage.put(key, image.data, "image/png")
        except StorageError as error:
            raise ApiError(
                503,
                "storage_unavailable",
                f"Storing the reference images failed: {error}",
                headers={"Retry-After": "5"},
            ) from error
        stored.append(
            ReferenceImage(
                key=key, width=image.width, height=image.height, sha256=image.sha256, bytes=len(image.data)
            )
        )
    return stored
