"""Liveness, readiness and Prometheus metrics (outside ``/v1``, no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    """Redis and storage are reachable; 503 with the failing checks otherwise."""
    checks: dict[str, Any] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as error:
        checks["redis"] = f"unavailable: {type(error).__name__}"
    try:
        services.storage.check()
        checks["storage"] = "ok"
    except Exception as error:  # StorageError and anything else: not ready
        checks["storage"] = f"unavailable: {error}"
    ready = all(value == "ok" for value in checks.values())
    status = "ok" if ready else "unavailable"
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus metrics of this gateway replica."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
