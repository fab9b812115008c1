"""Helpers for tests: free ports and bounded waits."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from shared.schemas import GenerationParams

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_redis_server(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A throwaway redis-server on a free loopback port (no persistence), answering before it returns."""
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=1)
    wait_for(lambda: _pings(client), 10, f"redis-server on port {port}")
    return server, port


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def generation_params(**overrides: object) -> GenerationParams:
    """Small, valid generation parameters for the tiny model; tests override what they care about."""
    values: dict[str, object] = {
        "model": "flux-tiny",
        "prompt": "a cat",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "seed": 1,
        "num_images": 1,
        "output_format": "png",
        "output_quality": 90,
    }
    values.update(overrides)
    return GenerationParams.model_validate(values)
