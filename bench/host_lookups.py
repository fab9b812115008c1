"""Host time of the execution-device lookups a FLUX.1-dev call makes (``python -m bench.host_lookups``).

FLUX.1-dev's architecture is built on the meta device (no weights: the walks depend on the module tree
only), then each lookup a ``FluxPipeline`` call makes is timed as diffusers answers it and once the
components are settled (``worker.optimizations.settled_devices``): ``_execution_device`` at the call's
start and ``get_module_execution_device`` for both text encoders and the VAE. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import bench.random_flux as random_flux


def meta_pipeline() -> Any:
    """FLUX.1-dev's components on the meta device: the module tree, with no weights to draw."""
    draw = random_flux.init_random
    random_flux.init_random = lambda module, draw_on=None: module
    try:
        return random_flux.build_flux1_dev("meta")
    finally:
        random_flux.init_random = draw


def call_lookups(pipeline: Any) -> Callable[[], None]:
    from diffusers.pipelines.flux import pipeline_flux

    def lookups() -> None:
        assert pipeline._execution_device is not None
        for component in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae):
            pipeline_flux.get_module_execution_device(component)

    return lookups


def median_ms(work: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    from worker.optimizations.settled_devices import settle_devices

    pipeline = meta_pipeline()
    modules = sum(
        1
        for part in pipeline.components.values()
        if isinstance(part, torch.nn.Module)
        for _ in part.modules()
    )
    lookups = call_lookups(pipeline)
    before = median_ms(lookups, args.repeats)
    settle_devices(pipeline)
    after = median_ms(lookups, args.repeats)
    print(json.dumps({"modules": modules, "lookups_ms_diffusers": before, "lookups_ms_settled": after}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
