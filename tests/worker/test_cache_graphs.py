"""Cache-DiT's block runs replayed as graphs: the same image and the same cached steps as cache-dit's own.

A recorder with a graph's semantics stands in for CUDA (``graph_support.RerunRecorder``); the device
checks the CUDA graphs themselves (``bench.pipeline``'s ``cache-fast`` against ``cache-fast-no-graphs``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.worker.graph_support import FailingRecorder, RerunRecorder
from worker.engine import cache_block_graphs_apply
from worker.optimizations.cache_dit import CacheController, CacheDitConfig, apply_cache_dit
from worker.optimizations.cache_graphs import apply_cache_block_graphs
from worker.optimizations.cuda_graphs import GraphConfig
from worker.parallel import ParallelLayout
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")
STEPS = 8


def fast(**overrides: Any) -> CacheDitConfig:
    return CacheDitConfig(enabled=True, scm_preset="fast", scm_policy="static", mc=-1, **overrides)


def cached_pipeline(config: CacheDitConfig, recorder: Any = None) -> tuple[Any, CacheController]:
    """The tiny FLUX.1 pipeline (one double block, one single block) under ``config``; its block runs
    graphed by ``recorder`` where one is given."""
    pipe: Any = build_tiny_pipeline("flux1", seed=0)
    controller = apply_cache_dit(pipe, {"preset": config})
    if recorder is not None:
        apply_cache_block_graphs(pipe.transformer, recorder, CPU, GraphConfig())
    return pipe, controller


def generate(pipe: Any, controller: CacheController, preset: str = "preset", seed: int = 0) -> torch.Tensor:
    controller.prepare(preset, STEPS)
    with torch.inference_mode():
        return pipe(
            prompt="a red cat",
            width=64,
            height=64,
            num_inference_steps=STEPS,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        ).images


def computed_steps(config: CacheDitConfig) -> int:
    mask = config.steps_mask(STEPS)
    assert mask is not None
    return mask.count(1)


@pytest.mark.parametrize(
    ("config", "graphed"),
    [
        (fast(), ("Fn", "Mn")),  # Fn = the double block, Mn = the single block
        (fast(bn=1), ("Fn", "Bn")),  # no middle blocks left: cache-dit's own (empty) run
    ],
)
def test_graphed_block_runs_give_cache_dits_image_and_cached_steps(
    config: CacheDitConfig, graphed: tuple[str, ...]
) -> None:
    plain, plain_controller = cached_pipeline(config)
    recorder = RerunRecorder()
    pipe, controller = cached_pipeline(config, recorder)
    expected = generate(plain, plain_controller)
    assert torch.equal(generate(pipe, controller), expected)
    assert controller.cached_steps() == plain_controller.cached_steps() == STEPS - computed_steps(config)
    assert recorder.captures == len(graphed)
    # Fn and Bn run at every step, Mn at the computed ones; each call replays (the first after its capture)
    runs = {"Fn": STEPS, "Bn": STEPS, "Mn": computed_steps(config)}
    assert recorder.replays == sum(runs[name] for name in graphed)
    # a second job replays the graphs captured by the first
    assert torch.equal(generate(pipe, controller), expected)
    assert recorder.captures == len(graphed)


def test_a_transformer_not_given_graphs_runs_cache_dits_own_code() -> None:
    recorder = RerunRecorder()
    apply_cache_block_graphs(build_tiny_pipeline("flux1").transformer, recorder, CPU, GraphConfig())
    pipe, controller = cached_pipeline(fast())
    generate(pipe, controller)
    assert recorder.captures == 0
    assert controller.cached_steps() == STEPS - computed_steps(fast())


def test_a_failed_capture_runs_the_blocks_eagerly_with_the_same_image() -> None:
    plain, plain_controller = cached_pipeline(fast())
    recorder = FailingRecorder()
    pipe, controller = cached_pipeline(fast(), recorder)
    assert torch.equal(generate(pipe, controller), generate(plain, plain_controller))
    assert recorder.captures == 2  # Fn and Mn tried once each, then eager
    generate(pipe, controller)
    assert recorder.captures == 2


def test_the_off_preset_runs_no_block_graphs() -> None:
    recorder = RerunRecorder()
    pipe, controller = cached_pipeline(fast(), recorder)
    generate(pipe, controller, preset="off")
    assert recorder.captures == 0


@pytest.mark.parametrize(
    ("layout", "applies"),
    [(ParallelLayout(), True), (ParallelLayout(ulysses=2), False), (ParallelLayout(ring=2), False)],
)
def test_block_graphs_apply_on_one_gpu_only(layout: ParallelLayout, applies: bool) -> None:
    assert cache_block_graphs_apply(layout) is applies
