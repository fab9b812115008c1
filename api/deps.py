"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.services import Services
from shared.errors import ApiError
from shared.keys import Principal
from shared.settings import Settings


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_principal(request: Request, services: ServicesDep) -> Principal:
    """The caller, from ``Authorization: Bearer <api key>``; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, api_key = header.partition(" ")
    if not header:
        raise ApiError(401, "missing_api_key", "Missing API key: send 'Authorization: Bearer <api key>'.")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise ApiError(401, "invalid_api_key", "The Authorization header must be 'Bearer <api key>'.")
    principal = services.keys.lookup(api_key.strip())
    if principal is None:
        raise ApiError(401, "invalid_api_key", "Invalid API key.")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
