"""Webhook secrets: each owner's ``whsec_`` signing secret, and its rotation."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel

from api.deps import CurrentPrincipal, ServicesDep
from api.services import Services
from shared.webhook_secrets import WebhookSecrets

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecretPublic(BaseModel):
    key: str


class WebhookSecretRotated(BaseModel):
    key: str
    previous_valid_until: str | None


def _secrets(services: Services) -> WebhookSecrets:
    return WebhookSecrets(services.redis, services.settings.webhook_secret_overlap_s)


@router.get("/default/secret", response_model=WebhookSecretPublic)
def get_secret(principal: CurrentPrincipal, services: ServicesDep, response: Response) -> WebhookSecretPublic:
    """The secret that signs your webhooks (created on first use), for any Standard Webhooks library."""
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecretPublic(key=_secrets(services).current(principal.owner))


@router.post("/default/secret/rotate", response_model=WebhookSecretRotated)
def rotate_secret(
    principal: CurrentPrincipal, services: ServicesDep, response: Response
) -> WebhookSecretRotated:
    """Issue a new secret; the old one keeps signing (a second signature) until previous_valid_until."""
    response.headers["Cache-Control"] = "no-store"
    rotation = _secrets(services).rotate(principal.owner)
    return WebhookSecretRotated(key=rotation.key, previous_valid_until=rotation.previous_valid_until)
