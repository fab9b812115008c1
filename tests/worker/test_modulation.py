"""FLUX.1's adaLN modulation projected once per job: the same images, the layers not run per step, and a
call out of the scheduler's order caught. The GPU speed is ``bench.pipeline``'s (docs/performance.md)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.support import generation_params
from tests.worker.graph_support import RerunRecorder
from tests.worker.transformer_support import inputs, relative_rms, tiny_transformer
from worker.cli import add_worker_arguments, engine_options
from worker.engine import FluxEngine
from worker.optimizations.cuda_graphs import GraphConfig, GraphedCalls, StepGraphs
from worker.optimizations.modulation import (
    Schedule,
    TabledLinear,
    apply_modulation_tables,
    modulation_layers,
)
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")


def engine(precompute: bool, kind: str = "flux1") -> FluxEngine:
    pipe = build_tiny_pipeline(kind, seed=0)
    options = EngineOptions(device="cpu", dtype="float32", precompute_modulation=precompute)
    return FluxEngine.from_pipeline(pipe, options, CPU)


def assert_same_image(a: Any, b: Any) -> None:
    """Equal up to the batched GEMMs' rounding: a pixel level here and there, not another image."""
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 2 and (a != b).mean() < 0.001


def pixels(engine: FluxEngine, **overrides: Any) -> np.ndarray:
    params = generation_params(**{"num_inference_steps": 4, **overrides})
    return np.asarray(engine.generate(params, lambda step, total: None).images[0], dtype=np.int16)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"negative_prompt": "blurry", "true_cfg_scale": 2.0}, {"num_images": 2}],
    ids=["plain", "true-cfg", "two-images"],
)
def test_precomputed_modulation_gives_the_per_step_image(overrides: dict[str, Any]) -> None:
    tabled = engine(True)
    assert len(tabled.modulation) == 1
    assert_same_image(pixels(tabled, **overrides), pixels(engine(False), **overrides))


def test_a_batch_of_prompts_gets_the_per_step_images() -> None:
    jobs = [generation_params(prompt=prompt, seed=seed) for prompt, seed in [("a cat", 1), ("rain", 2)]]
    images = [engine(flag).generate_batch(jobs, lambda step, total: None).images for flag in (True, False)]
    for tabled, plain in zip(*images, strict=True):
        assert_same_image(tabled, plain)


def test_modulation_layers_project_once_per_job_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    tabled = engine(True)
    (tables,) = tabled.modulation.values()
    projections = []
    project = type(tables).project
    monkeypatch.setattr(
        type(tables), "project", lambda self, e: projections.append(e.shape) or project(self, e)
    )
    per_step = []
    forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: per_step.append(self) or forward(self, x))
    pixels(tabled, negative_prompt="blurry", true_cfg_scale=2.0)  # two conditionings: two tables
    assert projections == [torch.Size([4, tables.layers[0].in_features])] * 2
    assert not [layer for layer in per_step if isinstance(layer, TabledLinear)]
    transformer = tables.transformer
    blocks = 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert len(tables.layers) == blocks + 1 and transformer.transformer_blocks  # and norm_out


def test_the_projection_replayed_as_a_graph_gives_the_same_image() -> None:
    graphed, plain = engine(True), engine(True)
    (tables,) = graphed.modulation.values()
    recorder = RerunRecorder()
    tables.graphs = GraphedCalls(tables.project_eagerly, recorder, CPU, GraphConfig())
    assert np.array_equal(pixels(graphed), pixels(plain))
    pixels(graphed, prompt="another prompt")  # the same shapes: the graph captured for the first job
    assert recorder.captures == 1 and recorder.replays == 2


def test_one_graph_serves_every_step_count_up_to_32() -> None:
    """Replayed as graphs, a table's rows are padded to 32 steps: the warm-up's 2-step job captures the
    graph every later job of up to 32 steps replays, each still getting its own steps' rows."""
    graphed, plain = engine(True), engine(True)
    (tables,) = graphed.modulation.values()
    recorder = RerunRecorder()
    tables.graphs = GraphedCalls(tables.project_eagerly, recorder, CPU, GraphConfig())
    for steps in (2, 4, 7, 28):
        expected = pixels(plain, num_inference_steps=steps)
        assert_same_image(pixels(graphed, num_inference_steps=steps), expected)
    assert recorder.captures == 1 and recorder.replays == 4
    pixels(graphed, num_inference_steps=33)  # over 32 steps: the next multiple, another graph
    assert recorder.captures == 2


def test_chunks_of_a_batch_replay_one_graph_the_last_one_padded() -> None:
    graphed = engine(True)
    (tables,) = graphed.modulation.values()
    tables.table_bytes = 3 * 2 * tables.rows.width * 4  # three steps of two images in fp32
    recorder = RerunRecorder()
    tables.graphs = GraphedCalls(tables.project_eagerly, recorder, CPU, GraphConfig())
    expected = pixels(engine(False), num_images=2, num_inference_steps=7)
    assert_same_image(pixels(graphed, num_images=2, num_inference_steps=7), expected)
    assert recorder.captures == 1 and recorder.replays == 3  # steps 0-2, 3-5, and 6 padded to three


def test_a_table_over_its_byte_cap_projects_its_steps_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    tabled = engine(True)
    (tables,) = tabled.modulation.values()
    tables.table_bytes = 3 * 2 * tables.rows.width * 4  # three steps of two images in fp32
    projections = []
    project = type(tables).project
    monkeypatch.setattr(
        type(tables), "project", lambda self, e: projections.append(e.shape[0]) or project(self, e)
    )
    expected = pixels(engine(False), num_images=2, num_inference_steps=7)
    assert_same_image(pixels(tabled, num_images=2, num_inference_steps=7), expected)
    assert projections == [3 * 2, 3 * 2, 1 * 2]  # steps 0-2, 3-5, 6


def test_outside_a_schedule_the_layers_project_as_usual() -> None:
    expected = tiny_transformer()(**inputs(torch.float32))[0]
    model = tiny_transformer()
    assert apply_modulation_tables(model) is not None
    assert torch.equal(model(**inputs(torch.float32))[0], expected)


def test_the_layers_keep_their_parameter_names() -> None:
    names = list(tiny_transformer().state_dict())
    model = tiny_transformer()
    apply_modulation_tables(model)
    assert list(model.state_dict()) == names


def test_other_models_and_hooked_layers_are_left_alone() -> None:
    assert apply_modulation_tables(build_tiny_pipeline("flux2", seed=0).transformer) is None
    model = tiny_transformer()
    model.norm_out.linear.register_forward_hook(lambda *args: None)  # as offload's streaming hooks
    assert apply_modulation_tables(model) is None
    assert not any(isinstance(layer, TabledLinear) for layer in modulation_layers(model))
    model = tiny_transformer()
    apply_modulation_tables(model)
    assert apply_modulation_tables(model) is None  # applied once


def steps(timesteps: Any) -> list[dict[str, Any]]:
    """One call per step, as the pipelines make them: the same conditioning tensors at every step."""
    fixed = inputs(torch.float32)
    return [{**fixed, "timestep": torch.as_tensor(t).expand(1) / 1000} for t in timesteps]


def scheduled(timesteps: torch.Tensor) -> tuple[Any, Schedule]:
    model = tiny_transformer()
    tables = apply_modulation_tables(model)
    assert tables is not None
    return model, tables.schedule(model, SimpleNamespace(timesteps=timesteps))


@torch.inference_mode()
def test_each_call_gets_its_steps_row() -> None:
    timesteps = torch.tensor([1000.0, 750.0, 500.0])
    model, schedule = scheduled(timesteps)
    calls = steps(timesteps)
    for call in calls:
        assert relative_rms(schedule(**call)[0], model(**call)[0]) < 1e-5
    schedule.verify()
    with pytest.raises(RuntimeError, match="more often than the 3 scheduled steps"):
        schedule(**calls[-1])


@torch.inference_mode()
def test_a_call_out_of_the_schedulers_order_fails_the_job() -> None:
    _, schedule = scheduled(torch.tensor([1000.0, 500.0]))
    for call in steps([500.0, 1000.0]):  # the rows' order reversed
        schedule(**call)
    with pytest.raises(RuntimeError, match="differed from its precomputed modulation row"):
        schedule.verify()


@torch.inference_mode()
def test_graph_replays_read_the_row_set_for_their_call() -> None:
    timesteps = torch.tensor([1000.0, 600.0, 200.0])
    model, schedule = scheduled(timesteps)
    recorder = RerunRecorder()
    schedule.inner = StepGraphs(model, recorder, CPU, GraphConfig())
    for call in steps(timesteps):
        assert relative_rms(schedule(**call)[0], model(**call)[0]) < 1e-5
    assert recorder.captures == 1 and recorder.replays == 3  # a replay serves the capturing call too
    assert len(schedule.tables.rows._static) == 1  # every step's row at one address


def graphs_compiled(run: Any) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code is kept per function, across models
    before = counters["stats"]["unique_graphs"]
    run()
    return int(counters["stats"]["unique_graphs"] - before)


@torch.no_grad()
def test_compiled_blocks_read_each_steps_row_without_recompiling() -> None:
    timesteps = torch.tensor([1000.0, 700.0, 400.0])
    calls = steps(timesteps)
    plain = tiny_transformer()
    plain.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # dynamo's tracing; no codegen
    stock = graphs_compiled(lambda: [plain(**call) for call in calls])
    model, schedule = scheduled(timesteps)
    expected = [model(**call)[0] for call in calls]
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    outputs: list[torch.Tensor] = []
    # the blocks' graphs are shared by every block of a class, as without the tables
    assert graphs_compiled(lambda: outputs.extend(schedule(**call)[0] for call in calls)) == stock
    for output, want in zip(outputs, expected, strict=True):
        assert relative_rms(output, want) < 1e-5
    schedule.verify()
    from torch._dynamo.utils import counters

    again = schedule.tables.schedule(model, schedule.scheduler)  # the next job
    before = counters["stats"]["unique_graphs"]
    [again(**call) for call in steps(timesteps)]
    assert counters["stats"]["unique_graphs"] == before


def test_engine_leaves_an_offloaded_transformer_alone() -> None:
    pipe = build_tiny_pipeline("flux1", seed=0)
    options = EngineOptions(device="cpu", dtype="float32", dit_cpu_offload=True)
    assert FluxEngine.from_pipeline(pipe, options, CPU).modulation == {}


def test_no_precompute_modulation_flag_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).precompute_modulation is True
    assert engine_options(parser.parse_args(["--no-precompute-modulation"])).precompute_modulation is False
