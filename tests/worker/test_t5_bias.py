"""T5's relative position bias laid out once (``worker.optimizations.t5_bias``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.integrations import sdpa_attention

from worker.engine import prepare_pipeline
from worker.optimizations.t5_bias import contiguous_position_bias
from worker.options import EngineOptions
from worker.tiny_model import build_tiny_pipeline


def tiny_t5() -> Any:
    return build_tiny_pipeline("flux1", seed=0).text_encoder_2


def bias_layouts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each layer's SDPA mask was built from a contiguous position bias (no copy of it)."""
    seen: list[bool] = []
    real = sdpa_attention.create_position_bias_mask

    def recorded(position_bias: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(position_bias.is_contiguous())
        return real(position_bias, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "create_position_bias_mask", recorded)
    return seen


@torch.no_grad()
def test_the_bias_is_laid_out_once_and_the_encoding_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = tiny_t5()
    assert encoder.config._attn_implementation == "sdpa"
    ids = torch.randint(0, encoder.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    layouts = bias_layouts(monkeypatch)
    expected = encoder(ids)[0]
    assert layouts and not any(layouts)  # each layer copied the permuted bias
    layouts.clear()
    assert contiguous_position_bias(encoder) == 1  # the first layer computes it; the others reuse it
    assert torch.equal(encoder(ids)[0], expected)
    assert layouts and all(layouts)
    assert contiguous_position_bias(encoder) == 0  # once


def test_models_without_t5_attention_are_left_alone() -> None:
    assert contiguous_position_bias(build_tiny_pipeline("flux1", seed=0).text_encoder) == 0  # CLIP


def test_the_engine_lays_out_t5s_bias_at_load() -> None:
    pipe = build_tiny_pipeline("flux1", seed=0)
    prepare_pipeline(pipe, EngineOptions(), torch.device("cpu"))
    assert contiguous_position_bias(pipe.text_encoder_2) == 0  # already done
