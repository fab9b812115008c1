"""Request-body caps per route: the routes that carry reference images get a larger one.

Every route keeps ``Limits.max_body_bytes`` (1 MiB) except ``POST /v1/jobs`` (``images`` as data
URIs) and ``POST /v1/images/edits`` (image uploads), which may carry up to
``Limits.max_image_body_bytes`` (32 MiB). On ``POST /v1/jobs`` everything but ``images`` must still
fit ``max_body_bytes`` (:func:`check_body_without_images`), so a large body is only ever large
because of its images, and those are bounded one by one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.limits import BodySizeLimit
from shared.errors import ApiError
from shared.schemas import JobCreate
from shared.settings import Limits

IMAGE_ROUTES = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/images/edits")})


class RouteBodyLimits:
    """:class:`api.limits.BodySizeLimit` with the image cap on :data:`IMAGE_ROUTES`, the default elsewhere."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.default = BodySizeLimit(app, limits.max_body_bytes)
        self.images = BodySizeLimit(app, max(limits.max_image_body_bytes, limits.max_body_bytes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope.get("method"), str(scope.get("path", "")).rstrip("/"))
        limit = self.images if scope["type"] == "http" and route in IMAGE_ROUTES else self.default
        await limit(scope, receive, send)


def check_body_without_images(body: JobCreate, limits: Limits) -> None:
    """413 when the job body, reference images left out, is over ``max_body_bytes``."""
    size = len(body.model_dump_json(exclude={"images"}, exclude_unset=True))
    if size > limits.max_body_bytes:
        raise ApiError(
            413,
            "request_too_large",
            f"The request body, reference images left out, must be at most {limits.max_body_bytes} bytes.",
            "body",
        )
