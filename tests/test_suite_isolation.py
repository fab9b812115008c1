"""The test run's own Redis: each test process (pytest-xdist's workers included) flushes only a server it
started itself."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REDIS_SERVER, unit_redis_url


def test_each_test_process_flushes_only_a_redis_server_it_started(pytestconfig: pytest.Config) -> None:
    if os.environ.get("FLUXGATE_TEST_PRIVATE_REDIS") != "1":
        pytest.skip("FLUXGATE_TEST_REDIS_URL names a server of the caller's")
    server = pytestconfig.stash[REDIS_SERVER]
    arguments = [str(argument) for argument in server.args]
    port = arguments[arguments.index("--port") + 1]
    assert server.poll() is None
    assert unit_redis_url() == f"redis://127.0.0.1:{port}/15"
    assert os.environ["FLUXGATE_TEST_INTEGRATION_REDIS_URL"] == f"redis://127.0.0.1:{port}/14"
