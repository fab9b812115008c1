"""How the suite runs in several pytest-xdist processes: each flushes only a Redis server it started itself,
and the longest files are handed out first."""

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


def test_the_longest_files_run_first_each_in_its_own_order() -> None:
    from types import SimpleNamespace

    from tests.conftest import LONGEST_FIRST, pytest_collection_modifyitems

    names = ["tests/api/test_a.py::one", f"{LONGEST_FIRST[1]}::x", "tests/api/test_a.py::two"]
    names += [f"{LONGEST_FIRST[0]}::y", f"{LONGEST_FIRST[0]}::z"]
    items = [SimpleNamespace(nodeid=name) for name in names]
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [item.nodeid for item in items] == [
        f"{LONGEST_FIRST[0]}::y",
        f"{LONGEST_FIRST[0]}::z",
        f"{LONGEST_FIRST[1]}::x",
        "tests/api/test_a.py::one",
        "tests/api/test_a.py::two",
    ]
