"""The deployment under test, as processes: Redis, the gateway, the GPU worker and the sweeper.

Standard library only: this runs before the carried wheels are installed. Each process logs to its
own file; every wait has a timeout and stops early, naming the log, when a process exits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_pings(port: int) -> bool:
    """A raw ``PING`` (no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def http_json(url: str, api_key: str | None = None, timeout: float = 5) -> tuple[int, Any]:
    """GET ``url``: its status and JSON body; status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None
    except (OSError, ValueError):
        return 0, None


@dataclass
class Stack:
    """The running processes of one deployment; ``env`` is what they were started with."""

    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``command`` from the repository root, its output in ``logs/<name>.log``."""
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                command, env=env or self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def python(self, name: str, *args: str) -> None:
        self.start(name, [sys.executable, *args])

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}; the end of its log:\n{tail}")

    def wait(self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> float:
        """Poll ``check`` until true; seconds waited. Raises on timeout or when a process has exited."""
        started = time.monotonic()
        while not check():
            self.check_alive()
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)
        return time.monotonic() - started

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM in reverse start order (the worker ends warm: its job in flight first), then SIGKILL."""
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def service_env(
    base: dict[str, str], redis_port: int, gateway_port: int, data_dir: Path, model: dict[str, Any]
) -> dict[str, str]:
    """The ``FLUXGATE_`` settings every process of the deployment shares: file:// storage, one model."""
    return {
        **base,
        "FLUXGATE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FLUXGATE_DATA_DIR": str(data_dir),
        "FLUXGATE_STORAGE_URL": f"file://{data_dir / 'files'}",
        "FLUXGATE_PUBLIC_BASE_URL": f"http://127.0.0.1:{gateway_port}",
        "FLUXGATE_MODELS": json.dumps([model]),
        "PYTHONUNBUFFERED": "1",
    }


def create_api_key(env: dict[str, str], owner: str) -> str:
    """A user key, made the way an operator makes one (``fluxgate keys create``)."""
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "keys", "create", "--owner", owner],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    keys = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("fg_")]
    if done.returncode != 0 or not keys:
        raise RuntimeError(f"fluxgate keys create failed ({done.returncode}): {done.stderr[-2000:]}")
    return keys[-1]


def live_workers(base_url: str, api_key: str, model: str) -> int:
    status, body = http_json(f"{base_url}/v1/models/{model}", api_key)
    return int(body.get("live_workers", 0)) if status == 200 and isinstance(body, dict) else 0


def environment_checked(env: dict[str, str]) -> dict[str, Any]:
    """Versions the run used, read in the services' environment (the carried wheels first on the path)."""
    probe = (
        "import json, importlib.metadata as m\n"
        "names = ['fastapi', 'uvicorn', 'celery', 'kombu', 'redis', 'pydantic', 'pillow', 'httpx',\n"
        "         'diffusers', 'transformers', 'torch', 'cache-dit']\n"
        "found = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        found[name] = None\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    versions: dict[str, Any] = (
        json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
    )
    return {"python": sys.version.split()[0], "packages": versions, "gpu": _nvidia_smi()}


def _nvidia_smi() -> str | None:
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def python_path(site: Path | None) -> str:
    """The carried wheels' folder (when installed) before the repository, then whatever was there."""
    parts = [str(site)] if site else []
    parts.append(str(REPO_ROOT))
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
