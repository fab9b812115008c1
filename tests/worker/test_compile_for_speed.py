"""What ``--compile`` puts beside the compiled blocks: the fused query/key processor and the compiled VAE
decoder, each only where it was measured (one resident, unsharded FLUX.1 transformer; a whole VAE)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")


def fused_processors(pipe: Any) -> int:
    return sum(isinstance(module.processor, FusedQKFluxAttnProcessor) for module in attentions(pipe))


def attentions(pipe: Any) -> list[Any]:
    return [module for module in pipe.transformer.modules() if hasattr(module, "processor")]


def prepared(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    # a group's sequence layout needs its process group: only what the engine decides is looked at here
    monkeypatch.setattr(engine_module, "apply_sequence_parallel", lambda *args: None)
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(**options), CPU)
    return pipe


@pytest.mark.parametrize(
    ("options", "applied"),
    [
        ({"compile": True}, True),
        ({}, False),  # measured with the compiled blocks only
        ({"compile": True, "fused_qk_norm_rope": False}, False),
        ({"compile": True, "dit_cpu_offload": True}, False),
        # a Ulysses group on diffusers' runtime (its exchange runs in the processor's dispatch)
        ({"compile": True, "num_gpus": 2}, True),
        ({"num_gpus": 2}, False),
        ({"compile": True, "num_gpus": 2, "sp_runtime": "cache-dit"}, False),  # cache-dit's own processors
        ({"compile": True, "num_gpus": 2, "ulysses_async": True}, False),
        ({"compile": True, "num_gpus": 2, "ring_degree": 2}, False),  # not measured with Ring
        ({"compile": True, "num_gpus": 2, "fused_qk_norm_rope": False}, False),
    ],
)
def test_engine_fuses_query_key_norm_and_rotary_when_it_compiles_a_resident_transformer_or_ulysses_group(
    options: dict[str, Any], applied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = prepared(options, monkeypatch)
    assert fused_processors(pipe) == (len(attentions(pipe)) if applied else 0)
    assert len(attentions(pipe)) == len(pipe.transformer.transformer_blocks) + len(
        pipe.transformer.single_transformer_blocks
    )


@pytest.mark.parametrize(
    ("options", "compiled"),
    [
        ({"compile": True}, True),
        ({}, False),
        ({"compile": True, "compile_vae": False}, False),
        ({"compile": True, "vae_cpu_offload": True}, False),  # streamed by its hooks
        ({"compile": True, "num_gpus": 2}, True),
        ({"compile": True, "num_gpus": 2, "parallel_vae": True}, False),  # the split decode patches it
    ],
)
def test_engine_compiles_the_vae_decoder_when_it_compiles_and_the_decoder_is_resident_and_whole(
    options: dict[str, Any], compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = prepared(options, monkeypatch)
    assert (pipe.vae.decoder._compiled_call_impl is not None) is compiled
    assert pipe.vae.encoder._compiled_call_impl is None  # Kontext's references still encode eagerly


def test_the_decoder_compiles_with_its_reductions_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models.autoencoders.vae import Decoder

    asked: list[dict[str, Any]] = []
    original = Decoder.compile
    monkeypatch.setattr(
        Decoder, "compile", lambda self, **kwargs: asked.append(kwargs) or original(self, **kwargs)
    )
    prepared({"compile": True}, monkeypatch)
    assert asked == [{"options": {"max_autotune_pointwise": True}}]


def test_no_fused_qk_and_no_compile_vae_flags_turn_them_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    defaults = engine_options(parser.parse_args([]))
    assert defaults.fused_qk_norm_rope is True and defaults.compile_vae is True
    off = engine_options(parser.parse_args(["--no-fused-qk-norm-rope", "--no-compile-vae"]))
    assert off.fused_qk_norm_rope is False and off.compile_vae is False


@torch.no_grad()
def test_the_fused_processor_keeps_the_pipelines_image() -> None:
    params = engine_module.internal_params(64, 64, 2, "off", prompt="a lighthouse")

    def image(fused: bool) -> torch.Tensor:
        pipe = build_tiny_pipeline("flux1", seed=0)
        engine = engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(), CPU)
        if fused:  # the processor alone: a CPU compile of the tiny model would add a minute
            engine_module.apply_fused_qk_norm_rope(pipe.transformer)
        output = engine.generate(params, lambda step, total: None)
        return torch.tensor(list(output.images[0].getdata()), dtype=torch.int16)

    assert torch.equal(image(fused=True), image(fused=False))
