"""The transformer's steps replayed as CUDA graphs: which calls a graph serves, and that it serves them right.

CUDA itself is checked on the device (``bench.pipeline``'s ``compiled`` against ``compiled-no-graphs``:
the same image to the bit). Here a recorder with a graph's semantics stands in: the capture runs the
forward once on the input buffers, and each replay runs it again on them, writing into the same outputs.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest
import torch

from tests.support import generation_params
from tests.worker.graph_support import FailingRecorder, RerunRecorder
from worker.cli import add_worker_arguments, engine_options
from worker.engine import FluxEngine, encoder_graphs_apply, step_graphs_apply
from worker.optimizations.cache_dit import CacheDitConfig, apply_cache_dit
from worker.optimizations.cuda_graphs import GraphConfig, StepGraphs, apply_step_graphs, on_device
from worker.options import EngineOptions
from worker.parallel import ParallelLayout
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")


class Scale(torch.nn.Module):
    """A forward with a tensor argument, a non-tensor one and a tuple output, as FLUX's transformer has."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.label = "scale"

    def forward(self, hidden: torch.Tensor, factor: float = 1.0, extra: Any = None) -> tuple[torch.Tensor]:
        return (self.linear(hidden) * factor,)


def graphed(recorder: Any, max_graphs: int = 8) -> tuple[Scale, StepGraphs]:
    module = Scale()
    return module, StepGraphs(module, recorder, CPU, GraphConfig(max_graphs=max_graphs))


@torch.inference_mode()
def test_replays_give_the_forward_of_each_calls_inputs() -> None:
    recorder = RerunRecorder()
    module, graphs = graphed(recorder)
    for seed in range(3):
        hidden = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(graphs(hidden, factor=2.0)[0], module(hidden, factor=2.0)[0])
    assert recorder.captures == 1 and recorder.replays == 3


@torch.inference_mode()
def test_outputs_are_copies_a_later_replay_leaves_alone() -> None:
    _, graphs = graphed(RerunRecorder())
    first = graphs(torch.ones(2, 4))[0]
    kept = first.clone()
    graphs(torch.zeros(2, 4))
    assert torch.equal(first, kept)
    (call,) = graphs.captured.values()
    assert first.data_ptr() != call.outputs[0].data_ptr()


@torch.inference_mode()
def test_a_strided_input_is_copied_into_a_contiguous_buffer() -> None:
    module, graphs = graphed(RerunRecorder())
    hidden = torch.randn(4, 2).t()  # (2, 4), not contiguous
    assert torch.equal(graphs(hidden)[0], module(hidden.contiguous())[0])
    assert graphs(torch.randn(2, 4)) is not None and len(graphs.captured) == 1  # the same signature


@torch.inference_mode()
def test_each_signature_gets_its_own_graph() -> None:
    recorder = RerunRecorder()
    _, graphs = graphed(recorder)
    graphs(torch.ones(2, 4))
    graphs(torch.ones(3, 4))  # another shape
    graphs(torch.ones(3, 4, dtype=torch.float64).float())  # the same one again
    graphs(torch.ones(3, 4), factor=0.5)  # another value of a non-tensor argument
    assert recorder.captures == 3 and len(graphs.captured) == 3


@torch.inference_mode()
def test_the_least_recently_used_graph_goes_beyond_max_graphs() -> None:
    recorder = RerunRecorder()
    _, graphs = graphed(recorder, max_graphs=2)
    for rows in (1, 2, 1, 3):  # 2 is the least recently used when 3 arrives
        graphs(torch.ones(rows, 4))
    assert [parts[0] for _, parts in graphs.captured] == [
        ("tensor", (1, 4), torch.float32),
        ("tensor", (3, 4), torch.float32),
    ]
    graphs(torch.ones(2, 4))
    assert recorder.captures == 4


@torch.inference_mode()
def test_an_unhashable_argument_runs_eagerly() -> None:
    recorder = RerunRecorder()
    _, graphs = graphed(recorder)
    graphs(torch.ones(2, 4), extra={1, 2})  # a value that could change unseen
    assert recorder.captures == 0


@torch.inference_mode()
def test_tensors_on_another_device_than_the_graphs_run_eagerly() -> None:
    recorder = RerunRecorder()
    graphs = StepGraphs(Scale(), recorder, torch.device("meta"), GraphConfig())
    graphs(torch.ones(2, 4))
    assert recorder.captures == 0


@pytest.mark.parametrize(
    ("place", "device", "same"),
    [
        ("cuda:0", "cuda", True),
        ("cuda:0", "cuda:0", True),
        ("cuda:1", "cuda:0", False),
        ("cpu", "cuda", False),
    ],
)
def test_a_tensor_on_cuda_0_is_on_the_engines_cuda_device(place: str, device: str, same: bool) -> None:
    assert on_device(torch.device(place), torch.device(device)) is same


def test_calls_under_autograd_run_eagerly() -> None:
    recorder = RerunRecorder()
    _, graphs = graphed(recorder)
    output = graphs(torch.ones(2, 4))[0]
    assert output.requires_grad and recorder.captures == 0


@torch.inference_mode()
def test_a_failed_capture_runs_eagerly_and_is_not_tried_again() -> None:
    recorder = FailingRecorder()
    module, graphs = graphed(recorder)
    hidden = torch.randn(2, 4)
    for _ in range(2):
        assert torch.equal(graphs(hidden)[0], module(hidden)[0])
    assert recorder.captures == 1 and not graphs.captured and len(graphs.refused) == 1


def test_attributes_are_the_modules_and_a_cpu_device_is_refused() -> None:
    module, graphs = graphed(RerunRecorder())
    assert graphs.label == "scale" and graphs.linear is module.linear
    with pytest.raises(ValueError, match="CUDA device"):
        apply_step_graphs(module, CPU, GraphConfig())
    with pytest.raises(ValueError, match="max_graphs"):
        GraphConfig(max_graphs=0)


@pytest.mark.parametrize(
    ("device", "layout", "offloaded", "applies"),
    [
        ("cuda", ParallelLayout(), set(), True),
        ("cuda", ParallelLayout(), {"text_encoder"}, True),
        ("cuda", ParallelLayout(), {"transformer"}, False),  # streamed under host control
        ("cpu", ParallelLayout(), set(), False),
        ("cuda", ParallelLayout(ulysses=2, ulysses_async=True), set(), True),  # its all-to-alls captured
        ("cuda", ParallelLayout(ring=2), set(), True),
        ("cuda", ParallelLayout(ulysses=2, ring=2), set(), True),
        ("cuda", ParallelLayout(dit_tp=2), set(), False),
    ],
)
def test_graphs_apply_to_a_resident_unsharded_transformer_on_cuda_alone_or_in_a_group(
    device: str, layout: ParallelLayout, offloaded: set[str], applies: bool
) -> None:
    assert step_graphs_apply(torch.device(device), layout, offloaded) is applies


def test_no_cuda_graphs_flag_turns_them_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).cuda_graphs is True
    assert engine_options(parser.parse_args(["--no-cuda-graphs"])).cuda_graphs is False


# --- in the engine, on a tiny FLUX.1 pipeline ---------------------------------------------------------


def engine_with_graphs(presets: dict[str, CacheDitConfig]) -> tuple[FluxEngine, RerunRecorder]:
    pipe: Any = build_tiny_pipeline("flux1", seed=0)
    engine = FluxEngine.from_pipeline(
        pipe, EngineOptions(device="cpu"), CPU, lambda p: apply_cache_dit(p, presets)
    )
    recorder = RerunRecorder()
    engine.graphs = StepGraphs(pipe.transformer, recorder, CPU, GraphConfig())
    return engine, recorder


def image(engine: FluxEngine, cache: str = "off", steps: int = 3) -> np.ndarray:
    params = generation_params(prompt="a red cat", seed=3, num_inference_steps=steps, cache=cache)
    return np.asarray(engine.generate(params, lambda step, total: None).images[0])


def test_the_engine_replays_every_step_and_draws_the_same_image() -> None:
    engine, recorder = engine_with_graphs({})
    plain, _ = engine_with_graphs({})
    plain.graphs = None
    assert np.array_equal(image(engine), image(plain))
    assert recorder.captures == 1 and recorder.replays == 3
    assert engine.graphs is not None and engine.pipeline.transformer is engine.graphs.module  # put back


def test_a_cache_preset_runs_the_transformer_itself_and_off_goes_back_to_the_graphs() -> None:
    engine, recorder = engine_with_graphs({"fast": CacheDitConfig(enabled=True, scm_preset="fast")})
    image(engine, cache="fast", steps=8)
    assert recorder.captures == 0
    image(engine, cache="off")
    assert recorder.captures == 1 and recorder.replays == 3


def test_a_batch_replays_its_own_graph() -> None:
    engine, recorder = engine_with_graphs({})
    jobs = [generation_params(prompt=prompt, seed=1, num_inference_steps=2) for prompt in ("a", "b")]
    engine.generate_batch(jobs, lambda step, total: None)
    image(engine, steps=2)
    assert recorder.captures == 2 and recorder.replays == 4  # batch of two, then one image


# --- the text encoders ----------------------------------------------------------------------------


def test_text_encoder_calls_replay_their_graphs_and_draw_the_same_image() -> None:
    engine, _ = engine_with_graphs({})
    plain, _ = engine_with_graphs({})
    plain.graphs = None
    recorder = RerunRecorder()
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(engine.pipeline, name)
        engine.encoder_graphs[name] = StepGraphs(encoder, recorder, CPU, GraphConfig())
    assert np.array_equal(image(engine), image(plain))
    assert recorder.captures == 2 and recorder.replays == 2  # CLIP and T5, once a call
    image(engine, steps=2)
    assert recorder.captures == 2 and recorder.replays == 4
    assert type(engine.pipeline.text_encoder).__name__ == "CLIPTextModel"  # put back after each call


@pytest.mark.parametrize(
    ("device", "name", "offloaded", "sharded", "applies"),
    [
        ("cuda", "text_encoder", set(), None, True),
        ("cuda", "text_encoder_2", set(), None, True),
        ("cpu", "text_encoder_2", set(), None, False),
        ("cuda", "text_encoder_2", {"text_encoder_2"}, None, False),  # streamed from the CPU
        ("cuda", "text_encoder_2", set(), "text_encoder_2", False),  # --tp-size shards it
        ("cuda", "text_encoder", set(), "text_encoder_2", True),
    ],
)
def test_encoder_graphs_apply_to_flux1_encoders_resident_on_cuda_and_whole(
    device: str, name: str, offloaded: set[str], sharded: str | None, applies: bool
) -> None:
    pipe: Any = build_tiny_pipeline("flux1", seed=0)
    encoder = getattr(pipe, name)
    assert encoder_graphs_apply(torch.device(device), name, encoder, offloaded, sharded) is applies


def test_flux2s_mistral_is_not_graphed() -> None:
    pipe: Any = build_tiny_pipeline("flux2", seed=0)
    assert not encoder_graphs_apply(torch.device("cuda"), "text_encoder", pipe.text_encoder, set(), None)
