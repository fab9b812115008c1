"""Cache-DiT presets: env knobs (both spellings), validation, and per-call presets on tiny FLUX pipelines.

With random weights the residual threshold decides unpredictably, so exact counts are checked with the
``static`` policy, which serves every mask-0 step from the cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from worker.optimizations.cache_dit import (
    CacheController,
    CacheDitConfig,
    CacheSettingError,
    apply_cache_dit,
    cache_config_from_env,
    cache_presets_from_env,
)
from worker.tiny_model import build_tiny_pipeline

SIZE = 64


def scm(preset: str = "fast", **overrides: Any) -> CacheDitConfig:
    return CacheDitConfig(enabled=True, scm_preset=preset, scm_policy="static", **overrides)


STATIC_PRESETS = {name: scm(name) for name in ("slow", "medium", "fast", "ultra")}


def generate(pipe: Any, steps: int, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    if type(pipe).__name__ == "FluxKontextPipeline":
        image = Image.new("RGB", (SIZE, SIZE), (200, 40, 90))
        kwargs = {"image": image, "_auto_resize": False, "max_area": SIZE * SIZE, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(
            prompt="a red cat",
            width=SIZE,
            height=SIZE,
            num_inference_steps=steps,
            guidance_scale=3.5,
            generator=generator,
            output_type="pt",
            **kwargs,
        ).images


def run(
    controller: CacheController, pipe: Any, preset: str | None, steps: int, **kwargs: Any
) -> torch.Tensor:
    controller.prepare(preset, steps, true_cfg="negative_prompt" in kwargs)
    return generate(pipe, steps, **kwargs)


def mask_cached(config: CacheDitConfig, steps: int) -> int:
    mask = config.steps_mask(steps)
    assert mask is not None
    return mask.count(0)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Pipelines never touched by cache-dit, for the 'off' comparisons."""
    return {kind: build_tiny_pipeline(kind) for kind in ("flux1", "kontext")}


# --- environment -------------------------------------------------------------------------------


def test_empty_environment_gives_sglang_defaults() -> None:
    config = cache_config_from_env({})
    assert config == CacheDitConfig()
    assert (config.enabled, config.fn, config.bn, config.warmup, config.rdt, config.mc) == (
        False, 1, 0, 4, 0.24, 3,
    )  # fmt: skip
    assert (config.taylorseer, config.ts_order, config.scm_preset, config.scm_policy) == (
        False, 1, "none", "dynamic",
    )  # fmt: skip


def test_both_spellings_are_read_and_fluxgate_wins() -> None:
    environ = {
        "SGLANG_CACHE_DIT_ENABLED": "true",
        "SGLANG_CACHE_DIT_FN": "2",
        "SGLANG_CACHE_DIT_RDT": "0.1",
        "FLUXGATE_CACHE_DIT_RDT": "0.3",
        "FLUXGATE_CACHE_DIT_SCM_POLICY": " Static ",
        "SGLANG_CACHE_DIT_SCM_POLICY": "dynamic",
        "SGLANG_CACHE_DIT_SCM_COMPUTE_BINS": "8, 3,3,2,2",
        "SGLANG_CACHE_DIT_SCM_CACHE_BINS": "1,2,2,2,3",
        "FLUXGATE_CACHE_DIT_MC": "",  # blank counts as unset
        "SGLANG_CACHE_DIT_MC": "-1",
    }
    config = cache_config_from_env(environ)
    assert (config.enabled, config.fn, config.rdt, config.scm_policy, config.mc) == (
        True,
        2,
        0.3,
        "static",
        -1,
    )
    assert (config.scm_compute_bins, config.scm_cache_bins) == ((8, 3, 3, 2, 2), (1, 2, 2, 2, 3))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("On", True), ("0", False), ("false", False), ("no", False)],
)
def test_booleans_accept_the_usual_words(raw: str, expected: bool) -> None:
    assert cache_config_from_env({"FLUXGATE_CACHE_DIT_TAYLORSEER": raw}).taylorseer is expected
    assert cache_config_from_env({"SGLANG_CACHE_DIT_ENABLED": raw}).enabled is expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"FLUXGATE_CACHE_DIT_RDT": "abc"}, "FLUXGATE_CACHE_DIT_RDT must be a number, got 'abc'"),
        ({"FLUXGATE_CACHE_DIT_RDT": "nan"}, "FLUXGATE_CACHE_DIT_RDT must be a finite number >= 0, got nan"),
        ({"SGLANG_CACHE_DIT_FN": "0"}, "SGLANG_CACHE_DIT_FN must be an integer >= 1, got 0"),
        ({"SGLANG_CACHE_DIT_BN": "-1"}, "SGLANG_CACHE_DIT_BN must be an integer >= 0, got -1"),
        ({"SGLANG_CACHE_DIT_WARMUP": "1.5"}, "SGLANG_CACHE_DIT_WARMUP must be an integer, got '1.5'"),
        ({"FLUXGATE_CACHE_DIT_MC": "-2"}, "FLUXGATE_CACHE_DIT_MC must be an integer >= -1 (-1: no limit)"),
        ({"FLUXGATE_CACHE_DIT_TS_ORDER": "0"}, "FLUXGATE_CACHE_DIT_TS_ORDER must be an integer >= 1"),
        ({"FLUXGATE_CACHE_DIT_ENABLED": "maybe"}, "FLUXGATE_CACHE_DIT_ENABLED must be a boolean"),
        ({"SGLANG_CACHE_DIT_SCM_PRESET": "turbo"}, "SGLANG_CACHE_DIT_SCM_PRESET must be one of none, slow"),
        ({"FLUXGATE_CACHE_DIT_SCM_POLICY": "lazy"}, "FLUXGATE_CACHE_DIT_SCM_POLICY must be one of dynamic"),
        (
            {"FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS": "8,x"},
            "FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS must be a list",
        ),
        ({"FLUXGATE_CACHE_DIT_SCM_CACHE_BINS": "1,2"}, "FLUXGATE_CACHE_DIT_SCM_CACHE_BINS must come with"),
        (
            {"FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS": "8,3", "SGLANG_CACHE_DIT_SCM_CACHE_BINS": "1,2,3"},
            "SGLANG_CACHE_DIT_SCM_CACHE_BINS must have as many entries as the 2 compute bins, or one fewer",
        ),
        (
            {"FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS": "8,0", "FLUXGATE_CACHE_DIT_SCM_CACHE_BINS": "1,2"},
            "FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS must list integers >= 1, got (8, 0)",
        ),
        ({"FLUXGATE_CACHE_DIT_RTD": "0.2"}, "unknown setting FLUXGATE_CACHE_DIT_RTD"),
    ],
)
def test_bad_values_are_rejected_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as error:
        cache_config_from_env(environ)
    assert str(error.value).startswith(message)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(CacheSettingError, match=r"^bn must be an integer >= 0, got -3$"):
        CacheDitConfig(bn=-3)
    with pytest.raises(
        CacheSettingError, match=r"^scm_preset must be one of none, slow, medium, fast, ultra"
    ):
        CacheDitConfig(scm_preset="Fast")


def test_presets_from_env_add_named_scm_presets_to_the_default() -> None:
    environ = {"SGLANG_CACHE_DIT_ENABLED": "1", "FLUXGATE_CACHE_DIT_RDT": "0.2"}
    environ |= {"FLUXGATE_CACHE_DIT_SCM_COMPUTE_BINS": "4,2", "FLUXGATE_CACHE_DIT_SCM_CACHE_BINS": "1,1"}
    presets = cache_presets_from_env({**environ, "FLUXGATE_CACHE_DIT_PRESETS": "fast, Ultra,"})
    assert list(presets) == ["default", "fast", "ultra"]
    assert presets["default"].scm_compute_bins == (4, 2)
    assert presets["fast"] == CacheDitConfig(enabled=True, rdt=0.2, scm_preset="fast")
    assert cache_presets_from_env({"FLUXGATE_CACHE_DIT_PRESETS": "medium"}) == {
        "medium": CacheDitConfig(enabled=True, scm_preset="medium")
    }
    assert cache_presets_from_env({}) == {}
    with pytest.raises(
        ValueError, match="FLUXGATE_CACHE_DIT_PRESETS lists 'none'; each entry must be one of"
    ):
        cache_presets_from_env({"FLUXGATE_CACHE_DIT_PRESETS": "fast,none"})


def test_steps_masks() -> None:
    assert CacheDitConfig().steps_mask(28) is None
    assert mask_cached(scm("fast"), 28) == 17
    assert scm("fast").steps_mask(2) == [1, 1]  # cache-dit has no schedule for 2 steps: compute them all
    bins = scm("none", scm_compute_bins=(4, 1, 1), scm_cache_bins=(1, 1))
    assert bins.steps_mask(8) == [1, 1, 1, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="covers 8 steps, but the request asked for 9"):
        bins.steps_mask(9)


def test_apply_rejects_bad_presets() -> None:
    pipe = build_tiny_pipeline("flux1")
    with pytest.raises(ValueError, match="default cache preset 'fast' is not among off"):
        apply_cache_dit(pipe, {}, default="fast")
    with pytest.raises(ValueError, match="'off' is reserved"):
        apply_cache_dit(pipe, {"off": scm()})
    with pytest.raises(ValueError, match="has enabled=False"):
        apply_cache_dit(pipe, {"x": CacheDitConfig()})
    controller = apply_cache_dit(pipe, {"fast": scm()})
    with pytest.raises(ValueError, match="unknown cache preset 'slow'; this worker offers off, fast"):
        controller.prepare("slow", 8)


# --- pipelines ---------------------------------------------------------------------------------


def test_each_scm_preset_caches_its_mask_at_28_steps() -> None:
    pipe = build_tiny_pipeline("flux1")
    controller = apply_cache_dit(pipe, STATIC_PRESETS, default="slow")
    counts = {}
    for name, config in STATIC_PRESETS.items():
        run(controller, pipe, name, 28)
        stats = controller.stats()
        assert (stats.preset, stats.executed_steps, stats.cached_steps) == (name, 28, mask_cached(config, 28))
        counts[name] = stats.cached_steps
    assert counts == {"slow": 10, "medium": 13, "fast": 17, "ultra": 20}


def test_off_runs_uncached_and_matches_a_pipeline_cache_dit_never_touched(reference: dict[str, Any]) -> None:
    pipe = build_tiny_pipeline("flux1")
    controller = apply_cache_dit(pipe, STATIC_PRESETS, default="fast")  # installed at load
    expected = generate(reference["flux1"], 12)
    assert torch.equal(run(controller, pipe, "off", 12), expected)
    assert controller.cached_steps() == 0
    cached = run(controller, pipe, "fast", 12)
    assert controller.cached_steps() == mask_cached(STATIC_PRESETS["fast"], 12) > 0
    assert not torch.equal(cached, expected)
    assert torch.equal(run(controller, pipe, "off", 12), expected)


def test_switching_presets_between_calls_keeps_each_count(reference: dict[str, Any]) -> None:
    pipe = build_tiny_pipeline("flux1")
    controller = apply_cache_dit(pipe, STATIC_PRESETS)
    expected_off = generate(reference["flux1"], 8)
    first_images: dict[str, torch.Tensor] = {"off": expected_off}
    for preset in ("off", "fast", "off", "medium", "medium", "fast"):
        image = run(controller, pipe, preset, 8)
        expected = 0 if preset == "off" else mask_cached(STATIC_PRESETS[preset], 8)
        assert controller.cached_steps() == expected, preset
        # Every call starts from a fresh cache context, so a preset repeats its image exactly.
        assert torch.equal(image, first_images.setdefault(preset, image)), preset


def test_changing_the_step_count_between_calls_follows_each_mask() -> None:
    pipe = build_tiny_pipeline("flux1")
    bins = scm("none", scm_compute_bins=(3, 1, 1), scm_cache_bins=(1, 2))
    controller = apply_cache_dit(pipe, {"fast": scm("fast"), "bins": bins}, default="fast")
    for preset, steps in (("fast", 12), ("fast", 8), ("fast", 20), ("bins", 8), ("bins", 6), ("fast", 4)):
        run(controller, pipe, preset, steps)
        config = bins if preset == "bins" else STATIC_PRESETS["fast"]
        assert controller.cached_steps() == mask_cached(config, steps) > 0, (preset, steps)
        assert controller.stats().executed_steps == steps


def test_kontext_caches_and_off_matches(reference: dict[str, Any]) -> None:
    pipe = build_tiny_pipeline("kontext")
    controller = apply_cache_dit(pipe, STATIC_PRESETS, default="fast")
    run(controller, pipe, "fast", 12)
    assert controller.cached_steps() == mask_cached(STATIC_PRESETS["fast"], 12) > 0
    assert torch.equal(run(controller, pipe, "off", 12), generate(reference["kontext"], 12))


def test_true_cfg_counts_steps_not_transformer_calls() -> None:
    pipe = build_tiny_pipeline("flux1")
    controller = apply_cache_dit(pipe, STATIC_PRESETS)
    run(controller, pipe, "fast", 12, negative_prompt="blurry", true_cfg_scale=2.0)
    assert controller.stats().executed_steps == 12
    assert controller.cached_steps() == mask_cached(STATIC_PRESETS["fast"], 12)


def test_threshold_preset_and_taylorseer_run() -> None:
    pipe = build_tiny_pipeline("flux1")
    presets = {"default": CacheDitConfig(enabled=True), "ts": scm("fast", taylorseer=True, ts_order=2)}
    controller = apply_cache_dit(pipe, presets, default="default")
    run(controller, pipe, None, 8)
    assert controller.stats().preset == "default"
    assert 0 <= controller.cached_steps() <= 8 - 4  # never inside the 4 warm-up steps
    image = run(controller, pipe, "ts", 8)
    assert controller.cached_steps() == mask_cached(presets["ts"], 8)
    assert torch.isfinite(image).all()


def test_a_pipeline_call_without_prepare_is_caught() -> None:
    pipe: Any = build_tiny_pipeline("flux1")
    controller = apply_cache_dit(pipe, STATIC_PRESETS, default="fast")
    with pytest.raises(RuntimeError, match="needs a prepare"):
        CacheController(pipe.transformer, STATIC_PRESETS, "off").stats()
    run(controller, pipe, "fast", 8)
    generate(pipe, 8)  # a second call on the same context
    with pytest.raises(RuntimeError, match="ran 16 steps since prepare\\(\\) for 8"):
        controller.stats()


def test_presets_switch_on_top_of_a_parallelism_enabled_once() -> None:
    """cache-dit's parallelism wraps the transformer's forward in a ``functools.partial`` and marks the
    transformer; ``disable_cache`` would drop the marks (and fail to rebind the partial), after which the
    next preset's forward bypasses the hooks. Here the hooks are a counting partial, on one process."""
    import functools

    pipe = build_tiny_pipeline("flux1")
    transformer = pipe.transformer
    calls = [0]

    def hooked(module: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return type(module).forward(module, *args, **kwargs)

    transformer.forward = functools.partial(hooked, transformer)
    transformer._is_parallelized, transformer._parallelism_config = True, "config"
    transformer._extra_parallel_modules = []
    controller = apply_cache_dit(pipe, STATIC_PRESETS)
    for preset in ("off", "fast", "off", "fast"):
        calls[0] = 0
        run(controller, pipe, preset, 8)
        assert calls[0] == 8, preset  # every step went through the hooks, cached or not
        assert (transformer._is_parallelized, transformer._parallelism_config) == (True, "config")
    assert controller.cached_steps() == mask_cached(STATIC_PRESETS["fast"], 8)


def test_presets_are_refused_on_diffusers_context_parallelism() -> None:
    pipe: Any = build_tiny_pipeline("flux1")
    pipe.transformer._parallel_config = object()  # what enable_parallelism(ContextParallelConfig) leaves
    with pytest.raises(ValueError, match="need cache-dit's sequence parallelism"):
        apply_cache_dit(pipe, STATIC_PRESETS)
    assert apply_cache_dit(pipe, {}).preset_names == ("off",)
