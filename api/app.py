"""The gateway's app factory: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.body_limits import RouteBodyLimits
from api.errors import install_error_handlers
from api.metrics import CountingJobStore, GatewayMetrics, MetricsMiddleware
from api.routes import admin, events, files, health, jobs, models, openai, webhooks
from api.services import Services
from shared.settings import Settings, load_settings

log = logging.getLogger("fluxgate.api")


def _ensure_bootstrap_admin(services: Services) -> None:
    key = services.settings.bootstrap_admin_key
    if not key:
        return
    try:
        services.keys.ensure(key, owner="admin", role="admin")
    except Exception as error:  # Redis may come up after the gateway; the key is ensured at next start.
        log.error("could not ensure FLUXGATE_BOOTSTRAP_ADMIN_KEY (is Redis up?): %s", error)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway for ``settings`` (default: from the environment)."""
    settings = settings or load_settings()
    services = Services(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_ensure_bootstrap_admin, services)
        yield
        await services.aclose()

    app = FastAPI(title="Fluxgate", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    app.state.metrics = GatewayMetrics(services.redis, [model.name for model in settings.models])
    services.store = CountingJobStore(services.redis, app.state.metrics.submitted)
    install_error_handlers(app, settings.redis_retry_after_s)
    for module in (jobs, events, files, models, health, webhooks, openai, admin):
        app.include_router(module.router)
    app.add_middleware(RouteBodyLimits, limits=settings.limits)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
