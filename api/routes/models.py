"""``GET /v1/models``: the configured models, their capabilities and live workers."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentPrincipal, ServicesDep
from shared.errors import ApiError
from shared.schemas import ModelList, ModelPublic
from shared.settings import ModelConfig
from shared.workers import live_worker_counts

router = APIRouter(prefix="/v1", tags=["models"])


def _public(model: ModelConfig, live: dict[str, int]) -> ModelPublic:
    return ModelPublic(
        id=model.name, capabilities=model.capabilities.model_dump(), live_workers=live.get(model.name, 0)
    )


@router.get("/models", response_model=ModelList)
def list_models(_: CurrentPrincipal, services: ServicesDep) -> ModelList:
    """List the models this deployment serves (OpenAI's list shape)."""
    live = live_worker_counts(services.redis)
    return ModelList(data=[_public(model, live) for model in services.settings.models])


@router.get("/models/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, _: CurrentPrincipal, services: ServicesDep) -> ModelPublic:
    """One configured model."""
    model = services.settings.model(model_id)
    if model is None:
        raise ApiError(404, "model_not_found", f"The model {model_id!r} does not exist.", "model")
    return _public(model, live_worker_counts(services.redis))
