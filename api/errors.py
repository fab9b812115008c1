"""Exception handlers: every error leaves the gateway in OpenAI's shape, body validation as 400."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ApiError, error_body
from shared.schemas import NOT_YET_SUPPORTED_FIELDS

log = logging.getLogger("fluxgate.api")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media"}


def _validation_error(error: dict[str, Any]) -> ApiError:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", "The request body is not valid JSON.")
    if kind == "extra_forbidden":
        if param in NOT_YET_SUPPORTED_FIELDS:
            return ApiError(400, "unsupported_parameter", f"{param} is not supported yet.", param)
        return ApiError(400, "unknown_parameter", f"Unknown parameter: {param}.", param)
    if kind == "missing":
        return ApiError(400, "missing_parameter", f"Missing required parameter: {param}.", param)
    if kind in ("model_attributes_type", "dict_type") and param is None:
        return ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return ApiError(400, "invalid_parameter", f"{param}: {error.get('msg', 'invalid value')}.", param)


def _respond(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Register the handlers that map every failure to a JSON error (never FastAPI's default 422)."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _respond(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        return _respond(
            _validation_error(dict(errors[0])) if errors else ApiError(400, "invalid_request", "Bad request.")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(error.status_code, "http_error")
        return JSONResponse(
            error_body(error.status_code, code, str(error.detail)), status_code=error.status_code
        )

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def redis_down(_: Request, error: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", error)
        unavailable = ApiError(
            503,
            "redis_unavailable",
            "The job store is unavailable; retry shortly.",
            headers={"Retry-After": str(retry_after_s)},
        )
        return _respond(unavailable)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return JSONResponse(error_body(500, "internal_error", "Internal server error."), status_code=500)
