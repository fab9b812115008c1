"""The deployment files: docker-compose.yml and the two images' Dockerfiles.

No Docker engine runs here, so these check what can be checked without one: the compose file
against the compose spec, the paths it and the Dockerfiles take from the repository, and the
invariants the design puts on the deployment (Redis never evicts, the gateway has no torch).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "deploy" / "Dockerfile.api"
WORKER_DOCKERFILE = ROOT / "deploy" / "Dockerfile.worker"
# ${NAME:-default}, the only interpolation form the compose file uses.
INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = (line.strip() for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _context_sources(dockerfile: Path) -> list[str]:
    """Paths the Dockerfile takes from the build context: COPY/ADD sources and bind-mount sources."""
    sources = []
    for instruction in _instructions(dockerfile):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() in {"COPY", "ADD"} and "--from=" not in rest:
            sources += [word for word in rest.split()[:-1] if not word.startswith("--")]
        sources += re.findall(r"--mount=type=bind,(?:[^ ]*,)?source=([^, ]+)", instruction)
    return sources


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment with ${NAME:-default} resolved to its default."""
    return {
        name: INTERPOLATION.sub(lambda match: match.group(2), str(value))
        for name, value in service.get("environment", {}).items()
    }


def test_compose_file_matches_the_compose_spec() -> None:
    check_jsonschema = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(check_jsonschema), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_build_context_and_dockerfile_exists(compose: dict[str, Any]) -> None:
    built = {name: service["build"] for name, service in compose["services"].items() if "build" in service}
    assert set(built) == {"api", "worker", "sweeper", "webhooks"}
    for name, build in built.items():
        context = ROOT / build["context"]
        assert context.is_dir(), f"{name}: build context {context} is missing"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        for source in _context_sources(dockerfile):
            assert (context / source).exists(), f"{dockerfile.name} takes {source}, absent from the context"


def test_every_mounted_path_and_named_volume_exists(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared_volumes, f"{name} mounts undeclared volume {source}"
        for env_file in service.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (ROOT / path).is_file(), f"{name} reads {path}, which does not exist"


def test_redis_persists_appends_and_never_evicts_jobs(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    command_line = command if isinstance(command, str) else " ".join(command)
    assert "--maxmemory-policy noeviction" in command_line
    assert "--appendonly yes" in command_line


def test_worker_reserves_one_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
        for device in devices
    )


def test_worker_caches_weights_on_a_volume_at_hf_home(compose: dict[str, Any]) -> None:
    hf_home = re.search(r"HF_HOME=(\S+)", WORKER_DOCKERFILE.read_text())
    assert hf_home is not None
    targets = [volume.split(":")[1] for volume in compose["services"]["worker"]["volumes"]]
    assert hf_home.group(1) in targets


def test_worker_gets_the_hf_token_and_time_to_finish_its_job(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "HF_TOKEN" in worker["environment"]
    minutes = re.fullmatch(r"(\d+)m", worker["stop_grace_period"])
    assert minutes is not None and int(minutes.group(1)) >= 1


def test_gateway_image_installs_without_torch() -> None:
    assert "[worker]" not in API_DOCKERFILE.read_text()
    assert not [line for line in _instructions(API_DOCKERFILE) if "torch" in line.lower()]
    base_dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [dep for dep in base_dependencies if re.match(r"(torch|diffusers|transformers)\b", dep)]


def test_worker_image_installs_the_worker_and_both_attention_extras() -> None:
    assert any(".[worker,fp8-attention,fa4-attention]" in line for line in _instructions(WORKER_DOCKERFILE))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("nvidia-cudnn-frontend") for dep in extras["fp8-attention"])
    assert any(dep.startswith("flash-attn-4") for dep in extras["fa4-attention"])


def test_services_use_minio_root_credentials_and_a_valid_model_list(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    minio = _environment(compose["services"]["minio"])
    for name in ("api", "worker"):
        environment = _environment(compose["services"][name])
        assert environment["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert environment["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        settings = load_settings()
        assert [model.name for model in settings.models] == ["flux-dev"]
        assert settings.storage_url == "s3://fluxgate/results"


def test_sweeper_and_webhook_delivery_run_from_the_gateway_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, command in (("sweeper", "sweeper"), ("webhooks", "webhooks")):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile.api"
        assert services[name]["command"][0] == command
        assert "deploy" not in services[name]  # no GPU for CPU processes
