"""Cache-DiT (DBCache and fixed step schedules) through the ``cache-dit`` library, chosen per request.

Knobs as in SGLang (``SGLANG_CACHE_DIT_*``; ``FLUXGATE_CACHE_DIT_*`` wins). A worker offers named presets
fixed at start; each request picks one or ``"off"``. How (cache-dit 1.5.3, paths under ``cache_dit/caching``):

* **Enable on the transformer**, not the pipeline: it gets its own *persistent* context
  (``cache_adapters/cache_adapter.py:193-198``) and only that instance is patched. A pipeline-level enable
  replaces ``type(pipe).__call__`` for every instance (``cache_adapter.py:205-222``), replays the config
  captured at enable time on each call, and ``refresh_context`` refuses it (``cache_adapter.py:703-706``).
* **Every call gets a fresh context** with its own step mask: ``refresh_context`` for the installed preset,
  ``disable_cache`` + ``enable_cache`` for another (``refresh_context`` *merges*, skipping ``None``
  values, ``cache_contexts/cache_config.py:117-121``, so it cannot drop a mask or a calibrator). Left to
  itself a persistent context never resets without ``num_inference_steps``, and with it resets one step
  late (``cache_contexts/cache_manager.py:100-109``: the next call's first step runs as step N).
* **"off"** is ``disable_cache``: no cache hook runs. The FLUX.1 adapter's forward (cache-dit's copy of
  diffusers' ``FluxTransformer2DModel.forward``, ``patch_functors/functor_flux.py:85``) stays; its
  output is bit-identical to diffusers' (tested).
* **Statistics.** ``num_inference_steps`` stays ``None``, so the counters are copied onto the modules after
  every transformer forward (``cache_manager.py:48-60``); ``CacheStats.cached_steps`` lists this call's
  cached steps (cleared at step 0 of each call); ``accumulated_*`` cover the context's life.
* **True CFG** (negative prompt, ``true_cfg_scale > 1``) runs the transformer twice per step, so cache-dit
  must count pairs (``enable_separate_cfg=True``), or the mask runs out half-way.
* **FluxKontextPipeline** works as-is: the context is the transformer's, no ``cache_context`` needed.
* **Worker groups.** cache-dit's sequence parallelism is enabled once, at load (``worker.parallel``), and
  the presets switch on top of it: ``cache_dit_groups.KeepParallelism`` undoes what ``disable_cache``
  does to it. Every
  rank takes the same decisions: masks are fixed, and the residual difference that a threshold compares
  is averaged over the world group, which is the group (``cache_contexts/cache_manager.py:611-614``,
  ``cache_blocks/pattern_base.py:370``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cache_dit
from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

from worker.optimizations.cache_dit_groups import KeepParallelism, check_parallelism_is_cache_dits

OFF = "off"
DEFAULT_PRESET = "default"
SCM_PRESETS = ("slow", "medium", "fast", "ultra")
SCM_POLICIES = ("dynamic", "static")
ENV_PREFIXES = ("FLUXGATE_CACHE_DIT_", "SGLANG_CACHE_DIT_")
INSTALL_STEPS = 28  # FLUX.1-dev's default step count; only sizes the mask installed at load time


class CacheSettingError(ValueError):
    """A Cache-DiT setting is out of range; ``setting`` is the field (or environment variable) it names."""

    def __init__(self, setting: str, requirement: str, value: object) -> None:
        super().__init__(f"{setting} {requirement}, got {value!r}")
        self.setting, self.requirement, self.value = setting, requirement, value


def _require(ok: bool, setting: str, requirement: str, value: object) -> None:
    if not ok:
        raise CacheSettingError(setting, requirement, value)


@dataclass(frozen=True)
class CacheDitConfig:
    """One Cache-DiT preset: DBCache (Fn/Bn/warmup/threshold), TaylorSeer and a step computation mask."""

    enabled: bool = False
    fn: int = 1  # Fn_compute_blocks: first blocks always computed; their residual drives the decision
    bn: int = 0  # Bn_compute_blocks: last blocks always computed
    warmup: int = 4  # max_warmup_steps: never cache before this step
    rdt: float = 0.24  # residual_diff_threshold
    mc: int = 3  # max_continuous_cached_steps (-1: no limit)
    taylorseer: bool = False
    ts_order: int = 1
    scm_preset: str = "none"  # fixed schedule: none | slow | medium | fast | ultra
    scm_compute_bins: tuple[int, ...] | None = None  # explicit schedule; wins over scm_preset
    scm_cache_bins: tuple[int, ...] | None = None
    scm_policy: str = "dynamic"  # mask-0 steps: "dynamic" (threshold decides) or "static" (always cached)

    def __post_init__(self) -> None:
        # cache-dit asserts Fn >= 1 at a call's first step (cache_contexts/cache_manager.py:524)
        _require(self.fn >= 1, "fn", "must be an integer >= 1", self.fn)
        for name in ("bn", "warmup"):
            _require(getattr(self, name) >= 0, name, "must be an integer >= 0", getattr(self, name))
        _require(math.isfinite(self.rdt) and self.rdt >= 0, "rdt", "must be a finite number >= 0", self.rdt)
        _require(self.mc >= -1, "mc", "must be an integer >= -1 (-1: no limit)", self.mc)
        _require(self.ts_order >= 1, "ts_order", "must be an integer >= 1", self.ts_order)
        for name, choices in (("scm_preset", ("none", *SCM_PRESETS)), ("scm_policy", SCM_POLICIES)):
            value = getattr(self, name)
            _require(value in choices, name, f"must be one of {', '.join(choices)}", value)
        self._check_bins()

    def _check_bins(self) -> None:
        compute, cache = self.scm_compute_bins, self.scm_cache_bins
        for name, bins in (("scm_compute_bins", compute), ("scm_cache_bins", cache)):
            if bins is not None:
                _require(len(bins) > 0 and min(bins) >= 1, name, "must list integers >= 1", bins)
        if (compute is None) != (cache is None):
            name = "scm_compute_bins" if compute is not None else "scm_cache_bins"
            raise CacheSettingError(
                name, "must come with the other bins list (both or neither)", compute or cache
            )
        if compute is not None and cache is not None:
            ok = len(compute) in (len(cache), len(cache) + 1)
            requirement = f"must have as many entries as the {len(compute)} compute bins, or one fewer"
            _require(ok, "scm_cache_bins", requirement, cache)

    def steps_mask(self, num_inference_steps: int) -> list[int] | None:
        """The compute (1) / cache (0) mask for a call of ``num_inference_steps``; ``None`` without one.

        Explicit bins must cover the call. cache-dit's presets exist for 4, 6 and >= 8 steps; other
        counts get an all-compute mask (nothing to cache in so few steps).
        """
        if self.scm_compute_bins is not None and self.scm_cache_bins is not None:
            covered = sum(self.scm_compute_bins) + sum(self.scm_cache_bins)
            if num_inference_steps > covered:
                raise ValueError(
                    f"the fixed schedule scm_compute_bins/scm_cache_bins covers {covered} steps, "
                    f"but the request asked for {num_inference_steps}"
                )
            compute, cache = list(self.scm_compute_bins), list(self.scm_cache_bins)
            return list(cache_dit.steps_mask(compute, cache, total_steps=num_inference_steps))
        if self.scm_preset == "none":
            return None
        if num_inference_steps < 8 and num_inference_steps not in (4, 6):
            return [1] * num_inference_steps
        return list(cache_dit.steps_mask(total_steps=num_inference_steps, mask_policy=self.scm_preset))

    def to_cache_dit(self, num_inference_steps: int, true_cfg: bool = False) -> dict[str, Any]:
        """``cache_config`` and ``calibrator_config`` for ``cache_dit.enable_cache`` / ``refresh_context``."""
        cache_config = DBCacheConfig(
            Fn_compute_blocks=self.fn,
            Bn_compute_blocks=self.bn,
            max_warmup_steps=self.warmup,
            residual_diff_threshold=self.rdt,
            max_continuous_cached_steps=self.mc,
            enable_separate_cfg=true_cfg,  # explicit, never None: refresh_context keeps old values for None
            steps_computation_mask=self.steps_mask(num_inference_steps),
            steps_computation_policy=self.scm_policy,
        )
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=self.ts_order) if self.taylorseer else None
        return {"cache_config": cache_config, "calibrator_config": calibrator}


def _to_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _parser(convert: Callable[[str], object], expected: str) -> Callable[[str, str], object]:
    """A parser of one variable's raw text whose errors name the variable and say what was expected."""

    def parse(name: str, raw: str) -> object:
        try:
            return convert(raw.strip())
        except ValueError:
            raise ValueError(f"{name} must be {expected}, got {raw!r}") from None

    return parse


_BOOL = _parser(_to_bool, "a boolean (1/0/true/false/yes/no/on/off)")
_INT = _parser(int, "an integer")
_BINS = _parser(
    lambda raw: tuple(int(part) for part in raw.split(",")), "a list of integers like '8,3,3,2,2'"
)
_WORD = _parser(str.lower, "a word")


_KNOBS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "ENABLED": ("enabled", _BOOL),
    "FN": ("fn", _INT),
    "BN": ("bn", _INT),
    "WARMUP": ("warmup", _INT),
    "RDT": ("rdt", _parser(float, "a number")),
    "MC": ("mc", _INT),
    "TAYLORSEER": ("taylorseer", _BOOL),
    "TS_ORDER": ("ts_order", _INT),
    "SCM_PRESET": ("scm_preset", _WORD),
    "SCM_COMPUTE_BINS": ("scm_compute_bins", _BINS),
    "SCM_CACHE_BINS": ("scm_cache_bins", _BINS),
    "SCM_POLICY": ("scm_policy", _WORD),
}


def _lookup(environ: Mapping[str, str], prefixes: tuple[str, ...], knob: str) -> tuple[str, str] | None:
    """The first ``prefix + knob`` set to a non-blank value, as (variable name, raw value)."""
    for prefix in prefixes:
        raw = environ.get(prefix + knob)
        if raw is not None and raw.strip():
            return prefix + knob, raw
    return None


def _reject_unknown(environ: Mapping[str, str], prefix: str) -> None:
    """A misspelt variable under our own prefix would be ignored silently; refuse it instead."""
    known = {prefix + knob for knob in (*_KNOBS, "PRESETS")}
    unknown = sorted(name for name in environ if name.startswith(prefix) and name not in known)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]}; known: {', '.join(sorted(known))}")


def cache_config_from_env(
    environ: Mapping[str, str], prefix_order: tuple[str, ...] = ENV_PREFIXES
) -> CacheDitConfig:
    """Read the Cache-DiT knobs; for each, the first prefix in ``prefix_order`` that sets it wins.

    Blank values count as unset. Bad values raise ``ValueError`` naming the variable.
    """
    _reject_unknown(environ, prefix_order[0])
    values: dict[str, Any] = {}
    variables: dict[str, str] = {}
    for knob, (field, parse) in _KNOBS.items():
        found = _lookup(environ, prefix_order, knob)
        if found is not None:
            values[field], variables[field] = parse(*found), found[0]
    try:
        return CacheDitConfig(**values)
    except CacheSettingError as error:
        variable = variables.get(error.setting, error.setting)
        raise CacheSettingError(variable, error.requirement, error.value) from None


def cache_presets_from_env(
    environ: Mapping[str, str], prefix_order: tuple[str, ...] = ENV_PREFIXES
) -> dict[str, CacheDitConfig]:
    """``"default"`` (the env knobs) when ENABLED, plus each SCM preset named in ``<prefix>PRESETS``.

    A named preset is the env config with that ``scm_preset`` (and no explicit bins, which would win).
    """
    base = cache_config_from_env(environ, prefix_order)
    presets = {DEFAULT_PRESET: base} if base.enabled else {}
    variable = prefix_order[0] + "PRESETS"
    for name in (part.strip().lower() for part in environ.get(variable, "").split(",")):
        if not name:
            continue
        if name not in SCM_PRESETS:
            raise ValueError(f"{variable} lists {name!r}; each entry must be one of {', '.join(SCM_PRESETS)}")
        presets[name] = dataclasses.replace(
            base, enabled=True, scm_preset=name, scm_compute_bins=None, scm_cache_bins=None
        )
    return presets


@dataclass(frozen=True)
class CacheCallStats:
    """What the cache did in the last pipeline call."""

    preset: str
    num_inference_steps: int
    cached_steps: int  # denoising steps served from the cache
    executed_steps: int  # denoising steps that ran since prepare() (fewer if the call was interrupted)


class CacheController:
    """Switches the transformer between ``"off"`` and the presets fixed at start; one call at a time."""

    def __init__(self, transformer: Any, presets: Mapping[str, CacheDitConfig], default: str) -> None:
        self._transformer = transformer
        self._parallelism = KeepParallelism(transformer)
        self._presets = dict(presets)
        self._default = default
        self._installed: str | None = None
        self._call: tuple[str, int] | None = None

    @property
    def preset_names(self) -> tuple[str, ...]:
        return (OFF, *self._presets)

    @property
    def default(self) -> str:
        return self._default

    def prepare(self, preset: str | None, num_inference_steps: int, true_cfg: bool = False) -> None:
        """Set up the cache for the next ``pipe(...)`` call (``None``: the default preset).

        ``true_cfg``: the call runs the transformer twice per step (negative prompt, true_cfg_scale > 1).
        """
        name = self._default if preset is None else preset
        if name not in self.preset_names:
            raise ValueError(
                f"unknown cache preset {name!r}; this worker offers {', '.join(self.preset_names)}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if name == OFF:
            self._uninstall()
        else:
            self._install(name, num_inference_steps, true_cfg)
        self._call = (name, num_inference_steps)

    def stats(self) -> CacheCallStats:
        """Statistics of the call made after the last ``prepare``."""
        if self._call is None:
            raise RuntimeError("stats() needs a prepare() and a pipeline call first")
        name, steps = self._call
        if name == OFF:
            return CacheCallStats(name, steps, cached_steps=0, executed_steps=steps)
        summary = cache_dit.summary(self._transformer, logging=False)[-1]
        executed = summary.accumulated_executed_steps
        if executed > steps:
            raise RuntimeError(
                f"the transformer ran {executed} steps since prepare() for {steps}: call prepare() "
                "before every pipeline call, with true_cfg=True for a negative prompt with true_cfg_scale > 1"
            )
        return CacheCallStats(name, steps, cached_steps=len(summary.cached_steps), executed_steps=executed)

    def cached_steps(self) -> int:
        """Steps served from the cache in the last call."""
        return self.stats().cached_steps

    def caching(self) -> bool:
        """Whether the prepared call runs cache hooks (a preset, not ``"off"``)."""
        return self._installed is not None

    def _install(self, name: str, steps: int, true_cfg: bool = False) -> None:
        configs = self._presets[name].to_cache_dit(steps, true_cfg)
        if self._installed == name:
            cache_dit.refresh_context(self._transformer, **configs)
            return
        self._uninstall()
        cache_dit.enable_cache(self._transformer, **configs)
        self._installed = name

    def _uninstall(self) -> None:
        if self._installed is not None:
            cache_dit.disable_cache(self._transformer)
            self._parallelism.restore()
            self._installed = None


def apply_cache_dit(pipe: Any, presets: Mapping[str, CacheDitConfig], default: str = OFF) -> CacheController:
    """Check the presets against ``pipe`` and install the default one; returns the per-call controller."""
    for name, config in presets.items():
        if name == OFF or not name.strip():
            raise ValueError(f"cache preset name {name!r} is reserved or blank")
        if not config.enabled:
            raise ValueError(f"cache preset {name!r} has enabled=False; leave it out instead")
    controller = CacheController(pipe.transformer, presets, default)
    if default not in controller.preset_names:
        raise ValueError(
            f"default cache preset {default!r} is not among {', '.join(controller.preset_names)}"
        )
    if presets:
        check_parallelism_is_cache_dits(pipe.transformer)
        _, prefixes = cache_dit.supported_pipelines()
        transformer_class = type(pipe.transformer).__name__
        if not any(transformer_class.startswith(prefix) for prefix in prefixes):
            raise ValueError(f"cache-dit has no block adapter for {transformer_class}")
    if default != OFF:
        controller.prepare(default, INSTALL_STEPS)
    return controller
