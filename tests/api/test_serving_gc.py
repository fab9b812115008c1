"""Garbage collection while the gateway serves: rarer, and never over the start-up objects."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from api.app import GC_GEN0_THRESHOLD, create_app
from shared.settings import Settings


def test_the_gateway_freezes_its_start_up_objects_and_collects_less_often_while_serving(
    settings: Settings,
) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 1000  # the app's routes, models and clients
    assert gc.get_threshold() == before  # restored on shutdown
    assert gc.get_freeze_count() == 0
