"""A small FLUX.1 transformer (every block kind, weights large enough to matter) and its inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxTransformer2DModel


def tiny_transformer(dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return model.to(dtype).eval()


def inputs(dtype: torch.dtype) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    tokens, text = 36, 7

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "hidden_states": draw(1, tokens, 16),
        "encoder_hidden_states": draw(1, text, 24),
        "pooled_projections": draw(1, 8),
        "timestep": torch.tensor([0.7]).to(dtype),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(tokens, 3, generator=generator),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


@torch.no_grad()
def compiled_error(prepare: Callable[[FluxTransformer2DModel], object]) -> float:
    """The relative RMS between the plain bf16 transformer's output and the same transformer prepared by
    ``prepare``, its repeated blocks then compiled each in one graph (a graph break fails the compile)."""
    bf16 = torch.bfloat16
    expected = tiny_transformer(bf16)(**inputs(bf16))[0]
    model = tiny_transformer(bf16)
    prepare(model)
    model.compile_repeated_blocks(fullgraph=True)
    return relative_rms(model(**inputs(bf16))[0], expected)
