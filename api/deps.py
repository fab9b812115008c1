"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.services import Services
from shared.errors import ApiError
from shared.keys import Principal
from shared.settings import Settings


# Async, though they do no I/O or only awaited I/O: FastAPI runs a plain-def dependency on a thread.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller, from ``Authorization: Bearer <api key>``; 401 otherwise (keys cached briefly:
    shared/keys.py)."""
    header = request.headers.get("authorization", "")
    scheme, _, api_key = header.partition(" ")
    if not header:
        raise ApiError(401, "missing_api_key", "Missing API key: send 'Authorization: Bearer <api key>'.")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise ApiError(401, "invalid_api_key", "The Authorization header must be 'Bearer <api key>'.")
    principal = await services.keys.lookup_async(api_key.strip(), services.redis_async)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "Invalid API key.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
