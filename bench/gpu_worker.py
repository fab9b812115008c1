"""A Fluxgate worker on FLUX.1-dev's architecture with random weights, for the end-to-end benchmark.

    CUDA_VISIBLE_DEVICES=0 python -m bench.gpu_worker --compile --warmup-resolutions 1024x1024

Weights cannot be downloaded on the GPU machine, so the pipeline is built in place of
``from_pretrained`` (``bench.random_flux``: the real shapes, the cost per step is the real one, the
pictures are noise). Everything after the build is the production path of ``fluxgate worker``
(``worker.cli.run_worker``): the same flags and ``FLUXGATE_`` settings, load-time options, cache presets,
warm-up, Celery consumer, runner, heartbeat, storage and metrics. ``--smoke`` serves the tiny
random-weight pipeline on the CPU instead, to check the benchmark on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

from shared.logging import configure_logging
from shared.settings import ModelConfig, load_settings
from worker.cli import EngineLoader, add_worker_arguments, run_worker
from worker.options import EngineOptions

log = logging.getLogger("fluxgate.worker")


def build_pipeline(smoke: bool, device: Any, dtype: Any) -> Any:
    """FLUX.1-dev's architecture on ``device``; the tiny pipeline (float32) for ``smoke``."""
    if smoke:
        from worker.tiny_model import build_tiny_pipeline

        return build_tiny_pipeline("flux1")
    from bench.random_flux import build_flux1_dev

    return build_flux1_dev(str(device), dtype)


def random_weights_loader(smoke: bool = False) -> EngineLoader:
    """A ``run_worker`` loader that builds random weights, then does what ``load_engine`` does after loading:
    the model's cache presets, the capability check and the warm-up of every (resolution, preset)."""

    def load(model: ModelConfig, options: EngineOptions, environ: Mapping[str, str]) -> Any:
        import time

        from worker.capabilities import check_capabilities
        from worker.engine import FluxEngine, resolve_device, resolve_dtype
        from worker.optimizations.cache_dit import apply_cache_dit
        from worker.startup import cache_presets_for_model

        device = resolve_device(options.device)
        if device.type != "cuda" and not smoke:
            raise SystemExit("bench.gpu_worker builds FLUX.1-dev on a GPU: pass --smoke to use the CPU")
        presets = cache_presets_for_model(model, environ)
        factory = (
            (lambda pipe: apply_cache_dit(pipe, presets, default=model.default_cache)) if presets else None
        )
        started = time.perf_counter()
        pipeline = build_pipeline(smoke, device, resolve_dtype(options.dtype, device))
        engine = FluxEngine.from_pipeline(pipeline, options, device, factory)
        check_capabilities(engine.pipeline_class, model.name, model.capabilities)
        log.info(
            "built %s with random weights on %s in %.1fs",
            engine.pipeline_class,
            device,
            time.perf_counter() - started,
        )
        if options.warmup:
            resolutions = options.resolutions or [(model.defaults.width, model.defaults.height)]
            seconds = engine.warmup(resolutions, model.cache_choices)
            log.info("warmed %s x presets %s in %.1fs", resolutions, model.cache_choices, seconds)
        return engine

    return load


def main(argv: list[str] | None = None) -> int:
    """Parse ``fluxgate worker``'s flags (plus ``--smoke``) and run the worker until it is stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny pipeline on the CPU (checks the benchmark)"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(json=settings.log_format == "json")
    return run_worker(args, settings, loader=random_weights_loader(args.smoke))


if __name__ == "__main__":
    raise SystemExit(main())
