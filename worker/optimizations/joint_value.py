"""FLUX.1's joint attention value written by its two projections in place (a benchmark's: no gain measured).

A double block's attention runs over the text and the image tokens together, so the fused processor
concatenates the two streams' value projections: on an H100 one 28 MB copy a double block, 9-24 ms an
image (inductor's ``cat_permute`` kernel, leases 59-61, docs/performance.md). Here each projection writes
its rows of one (batch, text + image tokens, features) buffer itself (``fluxgate::linear_into``: cuBLAS's
``out=`` into the slice), and inductor keeps the writes in place (tested), so no concatenation is left.

Measured on an H100 (lease 65): the step 0.2 ms shorter, the images' medians within their runs' spread,
so it is not the worker's. The same GEMMs with the same bias epilogue: the values are the
concatenation's. Used only for plain ``nn.Linear`` projections (``epilogues.plain_linear``; fp8 or sharded
weights, hooks: the processor concatenates as before).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("fluxgate::linear_into", mutates_args=("out",))
def linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """``out[b] = x[b] @ weight^T + bias`` for each batch element: its rows of a larger buffer."""
    for index in range(out.shape[0]):
        torch.addmm(bias, x[index], weight.t(), out=out[index])


@linear_into.register_fake
def _(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    return None


def joint_value(
    text: torch.Tensor, image: torch.Tensor, text_linear: nn.Linear, image_linear: nn.Linear
) -> torch.Tensor:
    """``cat([text_linear(text), image_linear(image)], dim=1)`` with each projection writing its own rows."""
    batch, text_tokens = text.shape[:2]
    joint = torch.empty(
        batch, text_tokens + image.shape[1], image_linear.out_features, dtype=image.dtype, device=image.device
    )
    linear_into(joint[:, :text_tokens], text, text_linear.weight, text_linear.bias)
    linear_into(joint[:, text_tokens:], image, image_linear.weight, image_linear.bias)
    return joint
