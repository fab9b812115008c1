"""The Kubernetes manifests under deploy/k8s.

No cluster runs here, so these validate the manifests offline: built-in kinds against the Kubernetes
schemas that the kubernetes-validate package ships, the KEDA ScaledObject against its CRD's
openAPIV3Schema vendored in tests/schemas/keda, and the invariants the design puts on the deployment
(the autoscaler counts every priority list of the model's queue, workers get a GPU and time to finish
their job, Redis never evicts, every FLUXGATE_* variable is a real setting).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.queue import PRIORITY_STEPS
from shared.settings import ModelConfig, Settings
from worker.options import EngineOptions

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda" / "scaledobject_v1alpha1.json"
# A version that kubernetes-validate ships; the manifests use nothing newer than 1.30's APIs.
KUBERNETES_VERSION = "1.30.0"
MODEL = "flux-dev"
WORKER = f"fluxgate-worker-{MODEL}"


def _manifest_files() -> list[Path]:
    return sorted(path for path in K8S_DIR.glob("*.yaml") if path.name != "kustomization.yaml")


def _load(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [document for path in _manifest_files() for document in _load(path)]


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def _strict(schema: Any) -> Any:
    """The schema with unknown fields rejected, as the API server's strict field validation does.

    CRD schemas leave additionalProperties unset (the server prunes unknown fields silently), which would
    let a misspelt field such as `minReplicas` pass here unnoticed.
    """
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in _manifest_files())
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), resource


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda path: path.name)
def test_every_manifest_parses_into_named_objects(path: Path) -> None:
    documents = _load(path)
    assert documents, f"{path.name} holds no object"
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), path.name
        assert document["metadata"].get("name"), path.name
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "fluxgate", path.name


def test_builtin_objects_match_the_kubernetes_schemas(objects: list[dict[str, Any]]) -> None:
    builtin = [obj for obj in objects if not obj["apiVersion"].startswith("keda.sh/")]
    assert builtin
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message} at {list(error.path)}")


def test_scaled_object_matches_the_vendored_keda_crd_schema(objects: list[dict[str, Any]]) -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    assert "keda.sh_scaledobjects.yaml" in schema["$comment"]
    scaled_objects = [obj for obj in objects if obj["kind"] == "ScaledObject"]
    assert scaled_objects
    validator = jsonschema.Draft4Validator(_strict(schema))
    for obj in scaled_objects:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        errors = sorted(validator.iter_errors(obj), key=lambda error: list(error.path))
        assert not errors, "\n".join(f"{list(error.path)}: {error.message}" for error in errors)


def test_the_strict_keda_schema_rejects_a_misspelt_field(objects: list[dict[str, Any]]) -> None:
    validator = jsonschema.Draft4Validator(_strict(json.loads(KEDA_SCHEMA.read_text())))
    broken = copy.deepcopy(_one(objects, "ScaledObject", WORKER))
    broken["spec"]["minReplicas"] = 0
    assert not validator.is_valid(broken)


def test_scaled_object_scales_the_worker_on_every_priority_list(objects: list[dict[str, Any]]) -> None:
    spec = _one(objects, "ScaledObject", WORKER)["spec"]
    deployment = _one(objects, "Deployment", WORKER)
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    # Running jobs are not in the lists: a short cooldown would drop the last worker mid-burst.
    assert spec["cooldownPeriod"] >= 300

    # The lists Celery's Redis transport keeps for the model's queue: step 0 under the queue's own name.
    queue = ModelConfig(name=MODEL, path="unused").queue
    expected = {queue if step == 0 else f"{queue}:{step}" for step in PRIORITY_STEPS.values()}
    assert expected == {"gen.flux-dev", "gen.flux-dev:3", "gen.flux-dev:6"}
    triggers = spec["triggers"]
    assert all(trigger["type"] == "redis" for trigger in triggers)
    lists = [trigger["metadata"]["listName"] for trigger in triggers]
    assert sorted(lists) == sorted(expected)
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert metadata["address"] == "redis.fluxgate.svc.cluster.local:6379"
        assert metadata["databaseIndex"] == "0"
        assert metadata["listLength"] == "1"

    # KEDA hands the HPA one metric per trigger and the HPA takes the max; the scaling modifier sums them.
    modifiers = spec["advanced"]["scalingModifiers"]
    assert sorted(modifiers["formula"].replace(" ", "").split("+")) == sorted(t["name"] for t in triggers)
    assert modifiers["target"] == "1"
    assert modifiers["metricType"] == "AverageValue"
    assert modifiers["activationTarget"] == "0"


def test_scaled_object_reads_the_redis_that_the_settings_name(objects: list[dict[str, Any]]) -> None:
    settings = _one(objects, "ConfigMap", "fluxgate-settings")["data"]
    redis_service = _one(objects, "Service", "redis")
    host = f"{redis_service['metadata']['name']}.{redis_service['metadata']['namespace']}.svc.cluster.local"
    port = redis_service["spec"]["ports"][0]["port"]
    assert settings["FLUXGATE_REDIS_URL"] == f"redis://{host}:{port}/0"
    models = json.loads(settings["FLUXGATE_MODELS"])
    assert MODEL in [model["name"] for model in models]


def test_worker_requests_a_gpu_and_time_to_finish_its_job(objects: list[dict[str, Any]]) -> None:
    deployment = _one(objects, "Deployment", WORKER)
    pod = deployment["spec"]["template"]["spec"]
    assert "replicas" not in deployment["spec"]  # owned by KEDA's HPA
    assert pod["terminationGracePeriodSeconds"] >= 300
    (worker,) = pod["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][:3] == ["worker", "--model-name", MODEL]
    env = {variable["name"]: variable for variable in worker["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "fluxgate-secrets"
    mounts = {mount["mountPath"]: mount["name"] for mount in worker["volumeMounts"]}
    assert mounts["/cache/huggingface"] == "hf-cache"
    assert mounts[env["FLUXGATE_COMPILE_CACHE_DIR"]["value"]] == "compile-cache"
    claims = {
        volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]
    }
    for name in ("hf-cache", "compile-cache"):
        _one(objects, "PersistentVolumeClaim", claims[name])


def test_redis_persists_appends_and_never_evicts_jobs(objects: list[dict[str, Any]]) -> None:
    statefulset = _one(objects, "StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 1
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    command_line = " ".join(redis.get("command", []) + redis.get("args", []))
    assert "--maxmemory-policy noeviction" in command_line
    assert "--appendonly yes" in command_line
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]


def test_gateway_is_probed_scaled_and_non_root(objects: list[dict[str, Any]]) -> None:
    deployment = _one(objects, "Deployment", "fluxgate-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (gateway,) = pod["containers"]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["resources"]["requests"]["cpu"]
    hpas = [obj for obj in objects if obj["kind"] == "HorizontalPodAutoscaler"]
    (hpa,) = [hpa for hpa in hpas if hpa["spec"]["scaleTargetRef"]["name"] == "fluxgate-gateway"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    _one(objects, "Service", "fluxgate-gateway")


def test_cpu_processes_run_from_the_gateway_image_without_a_gpu(objects: list[dict[str, Any]]) -> None:
    for name, command in (("fluxgate-sweeper", "sweeper"), ("fluxgate-webhooks", "webhooks")):
        deployment = _one(objects, "Deployment", name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith("fluxgate-api")
        assert container["args"][0] == command
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert _one(objects, "Deployment", "fluxgate-sweeper")["spec"]["replicas"] == 1


def test_secret_is_a_template_of_placeholders(objects: list[dict[str, Any]]) -> None:
    secret = _one(objects, "Secret", "fluxgate-secrets")
    assert "data" not in secret
    assert all(value.startswith("change-me") for value in secret["stringData"].values())


def _variable_names(objects: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            names |= set(obj["data"])
        elif obj["kind"] == "Secret":
            names |= set(obj.get("stringData", {})) | set(obj.get("data", {}))
        for container in _containers(obj):
            names |= {variable["name"] for variable in container.get("env", [])}
    return names


def test_every_variable_is_a_real_setting(objects: list[dict[str, Any]]) -> None:
    fields = set(Settings.model_fields) | set(EngineOptions.model_fields)
    names = _variable_names(objects)
    assert "FLUXGATE_REDIS_URL" in names
    for name in names:
        if name.startswith("FLUXGATE_"):
            assert name.removeprefix("FLUXGATE_").lower() in fields, f"{name} is not a setting"
        else:
            assert name.startswith(("AWS_", "HF_")), f"{name} is neither FLUXGATE_*, AWS_* nor HF_*"


def test_secret_keys_referenced_by_containers_exist(objects: list[dict[str, Any]]) -> None:
    secret_keys = set(_one(objects, "Secret", "fluxgate-secrets")["stringData"])
    configmaps = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "ConfigMap"}
    for obj in objects:
        for container in _containers(obj):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["name"] == "fluxgate-secrets"
                    assert reference["key"] in secret_keys
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
