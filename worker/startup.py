"""Worker start-up: the engine for a configured model, with its cache presets, checked and warmed."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from shared.settings import ModelConfig
from worker.options import EngineOptions

log = logging.getLogger("fluxgate.worker")


class StartupError(Exception):
    """The worker cannot serve this model as configured; the message says what to change."""


def cache_presets_for_model(model: ModelConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """The Cache-DiT presets the model's configuration offers, tuned by the ``*_CACHE_DIT_*`` knobs.

    The model configuration (``cache_presets``) is authoritative, since the gateway validates the
    request's ``cache`` against it: ``default`` is the knobs' threshold-driven DBCache, ``slow`` ...
    ``ultra`` add cache-dit's fixed compute/cache step schedules.
    """
    from worker.optimizations.cache_dit import DEFAULT_PRESET, SCM_PRESETS, cache_config_from_env

    base = cache_config_from_env(environ)
    if base.enabled and not model.cache_presets:
        raise StartupError(
            f"Cache-DiT is enabled in the environment, but the model {model.name!r} offers no cache presets: "
            'add "cache_presets": ["default"], "default_cache": "default" to its FLUXGATE_MODELS entry'
        )
    presets: dict[str, Any] = {}
    for name in model.cache_presets:
        if name == DEFAULT_PRESET:
            presets[name] = dataclasses.replace(base, enabled=True)
        elif name in SCM_PRESETS:
            presets[name] = dataclasses.replace(
                base, enabled=True, scm_preset=name, scm_compute_bins=None, scm_cache_bins=None
            )
        else:
            known = ", ".join((DEFAULT_PRESET, *SCM_PRESETS))
            raise StartupError(f"model {model.name!r}: cache preset {name!r} is not one of {known}")
    return presets


def load_engine(model: ModelConfig, options: EngineOptions, environ: Mapping[str, str]) -> Any:
    """Load, check capabilities, set up cache presets and warm every (resolution, preset) pair."""
    from worker.capabilities import CapabilityMismatch, check_capabilities
    from worker.engine import FluxEngine
    from worker.optimizations.cache_dit import apply_cache_dit

    presets = cache_presets_for_model(model, environ)
    if options.num_gpus > 1:  # every rank resolves "auto" the same way: same model, same options
        options = options.model_copy(update={"sp_runtime": options.resolved_sp_runtime(bool(presets))})
    if presets and options.num_gpus > 1 and options.sp_runtime == "diffusers":
        raise StartupError(
            f"model {model.name!r} offers Cache-DiT presets ({', '.join(presets)}), which a group on "
            "--sp-runtime diffusers does not run: a cached step under diffusers' context parallelism "
            "returns the whole sequence where the rank's shard is expected. Use --sp-runtime cache-dit "
            "or auto (the default), or drop the model's cache_presets for this group"
        )
    factory = (lambda pipe: apply_cache_dit(pipe, presets, default=model.default_cache)) if presets else None
    try:
        engine = FluxEngine.load(options.model_path or model.path, options, factory)
        check_capabilities(engine.pipeline_class, model.name, model.capabilities)
    except (CapabilityMismatch, ValueError) as error:
        raise StartupError(str(error)) from error
    if options.warmup:
        resolutions = options.resolutions or [(model.defaults.width, model.defaults.height)]
        seconds = engine.warmup(resolutions, model.cache_choices)
        log.info("warmed %s x presets %s in %.1fs", resolutions, model.cache_choices, seconds)
    return engine
