"""All four FLUX pipeline kinds load through from_pretrained and generate through run_job."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobStore
from shared.schemas import GenerationParams
from shared.settings import ModelCapabilities, ModelConfig
from shared.storage import LocalStorage
from tests.support import generation_params
from worker.capabilities import CapabilityMismatch, check_capabilities
from worker.engine import FluxEngine
from worker.options import EngineOptions
from worker.runner import WorkerRuntime, run_job
from worker.startup import StartupError, cache_presets_for_model, load_engine
from worker.tiny_model import save_tiny_model

EXPECTED_CLASS = {
    "flux1": "FluxPipeline",
    "schnell": "FluxPipeline",
    "kontext": "FluxKontextPipeline",
    "flux2": "Flux2Pipeline",
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {kind: save_tiny_model(root / kind, kind=kind) for kind in EXPECTED_CLASS}


def params(**overrides: object) -> GenerationParams:
    return generation_params(**{**{"model": "m", "prompt": "a red boat", "seed": 9}, **overrides})


@pytest.mark.parametrize("kind", list(EXPECTED_CLASS))
def test_each_pipeline_kind_runs_a_job_end_to_end(
    kind: str, model_dirs: dict[str, Path], redis_client: redis.Redis, tmp_path: Path
) -> None:
    engine = FluxEngine.load(str(model_dirs[kind]), EngineOptions(device="cpu"))
    assert engine.pipeline_class == EXPECTED_CLASS[kind]
    store = JobStore(redis_client)
    runtime = WorkerRuntime(store, LocalStorage(tmp_path, "http://h", b"k"), engine, "w1", max_attempts=3)
    job_id = store.create(new_job_id(), "alice", params(guidance_scale=0.0 if kind == "schnell" else 3.5)).id
    assert run_job(job_id, 1, runtime) == "succeeded", (store.get(job_id) or params()).model_dump()
    record = store.get(job_id)
    assert record is not None and record.images is not None
    assert (record.images[0].width, record.images[0].height) == (64, 64)


def test_kontext_and_flux2_capabilities_allow_editing_but_flux1_does_not() -> None:
    check_capabilities("FluxKontextPipeline", "k", ModelCapabilities(edit=True, max_reference_images=1))
    check_capabilities("Flux2Pipeline", "f2", ModelCapabilities(edit=True, max_reference_images=8))
    with pytest.raises(CapabilityMismatch):
        check_capabilities("FluxKontextPipeline", "k", ModelCapabilities(edit=True, max_reference_images=2))


def model(tiny: Path, **overrides: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "flux-tiny", "path": str(tiny), **overrides})


def test_model_presets_are_built_from_the_env_knobs(model_dirs: dict[str, Path]) -> None:
    config = model(model_dirs["flux1"], cache_presets=["default", "fast"], default_cache="fast")
    presets = cache_presets_for_model(config, {"SGLANG_CACHE_DIT_RDT": "0.3", "FLUXGATE_CACHE_DIT_FN": "2"})
    assert set(presets) == {"default", "fast"}
    assert (
        presets["default"].rdt == 0.3
        and presets["default"].fn == 2
        and presets["default"].scm_preset == "none"
    )
    assert presets["fast"].scm_preset == "fast" and presets["fast"].enabled


def test_enabled_cache_without_model_presets_refuses_to_start(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(StartupError, match="cache_presets"):
        cache_presets_for_model(model(model_dirs["flux1"]), {"FLUXGATE_CACHE_DIT_ENABLED": "true"})
    with pytest.raises(StartupError, match="not one of"):
        cache_presets_for_model(model(model_dirs["flux1"], cache_presets=["turbo"]), {})
    with pytest.raises(ValueError, match="FLUXGATE_CACHE_DIT_RDT"):
        cache_presets_for_model(model(model_dirs["flux1"]), {"FLUXGATE_CACHE_DIT_RDT": "abc"})


def test_per_request_cache_preset_switches_between_calls(model_dirs: dict[str, Path]) -> None:
    config = model(model_dirs["flux1"], cache_presets=["fast", "ultra"])
    engine = load_engine(
        config, EngineOptions(device="cpu", warmup=False), {"FLUXGATE_CACHE_DIT_SCM_POLICY": "static"}
    )
    counts = {}
    for preset in ("off", "fast", "off", "ultra"):
        output = engine.generate(params(num_inference_steps=28, cache=preset), lambda step, total: None)
        counts.setdefault(preset, []).append(output.cached_steps)
    assert counts == {"off": [0, 0], "fast": [17], "ultra": [20]}


def test_startup_warms_each_resolution_and_preset(model_dirs: dict[str, Path]) -> None:
    config = model(model_dirs["flux1"], cache_presets=["fast"])
    calls: list[tuple[int, int, str]] = []
    engine = load_engine(config, EngineOptions(device="cpu", warmup=False), {})
    original = engine.generate
    engine.generate = lambda p, cb: calls.append((p.width, p.height, p.cache)) or original(p, cb)  # type: ignore[method-assign]
    engine.warmup([(64, 64), (80, 64)], config.cache_choices)
    assert calls == [(64, 64, "off"), (64, 64, "fast"), (80, 64, "off"), (80, 64, "fast")]
