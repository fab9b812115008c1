"""--vae-gemm-attention: the compiled decoder's one-head attention as two GEMMs around an fp32 softmax; the
same output as SDPA's, diffusers' processor for every other call."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import vae_attention
from worker.optimizations.vae_attention import GemmAttnProcessor, apply_gemm_attention, gemm_attention

from .device_support import compiled_engine_vae_decoder
from .vae_support import tiny_vae


@pytest.mark.parametrize("chunk", [4096, 50])
def test_the_gemm_attention_is_sdpas_in_chunks_of_queries(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(vae_attention, "QUERY_CHUNK", chunk)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 130, 64, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None])[:, 0]
    assert torch.allclose(gemm_attention(query, key, value), expected, atol=1e-5)


@torch.no_grad()
def test_the_decoder_with_the_gemm_attention_decodes_the_same_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vae_attention, "QUERY_CHUNK", 100)  # the 16 x 16 latent's 256 positions in 3 chunks
    vae = tiny_vae()
    latent = torch.randn(1, 4, 16, 16)
    expected = vae.decode(latent).sample
    assert apply_gemm_attention(vae.decoder) == 1
    assert torch.allclose(vae.decode(latent).sample, expected, atol=1e-5)
    vae.decoder.compile(fullgraph=True)
    assert torch.allclose(vae.decode(latent).sample, expected, atol=1e-5)


@torch.no_grad()
def test_other_attentions_and_calls_keep_diffusers_processor() -> None:
    torch.manual_seed(0)
    heads = Attention(32, heads=2, dim_head=16, processor=AttnProcessor2_0())
    assert apply_gemm_attention(heads) == 0 and type(heads.processor) is AttnProcessor2_0
    one = Attention(32, heads=1, dim_head=32, processor=AttnProcessor2_0())
    apply_gemm_attention(one)
    assert isinstance(one.processor, GemmAttnProcessor)
    hidden, text = torch.randn(1, 10, 32), torch.randn(1, 5, 32)
    expected = AttnProcessor2_0()(one, hidden, encoder_hidden_states=text)
    assert torch.equal(one(hidden, encoder_hidden_states=text), expected)  # 3-d, with text: diffusers'


def test_the_compiled_engine_gives_the_decoder_the_gemm_attention_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given: list[torch.nn.Module] = []  # the tiny model's decoder has no attention: the call itself is checked
    monkeypatch.setattr(engine_module, "apply_gemm_attention", lambda decoder: given.append(decoder) or 0)
    decoder = compiled_engine_vae_decoder(monkeypatch)
    assert given == [decoder]
    given.clear()
    compiled_engine_vae_decoder(monkeypatch, vae_gemm_attention=False)
    assert given == []
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).vae_gemm_attention is True
    assert engine_options(parser.parse_args(["--no-vae-gemm-attention"])).vae_gemm_attention is False
