"""The whole transformer as one compiled program (an experiment beside the worker's regional compile).

Eager rounds ``timestep * 1000`` (and the guidance's) to bf16 before the sinusoidal time embedding; a
graph that fuses the product into the embedding keeps it in fp32, and the embedding then moves ~35%: another
image (21.5 dB against eager on an H100). Inductor's ``emulate_precision_casts`` keeps the roundings but
slowed every fused kernel (lease 21: the RMSNorm+RoPE kernels 4x, the image 4.35 s against 4.00). Here the
embedder runs eager instead, behind a graph break: the graph before it returns the product as a bf16
tensor, rounded as eager rounds it, and the blocks after it compile (and replay as CUDA graphs) as before.
"""

from __future__ import annotations

from typing import Any

import torch


def compile_whole(transformer: Any, mode: str) -> None:
    """Compile ``transformer`` whole (``mode`` "default" or a torch.compile mode), its time embedder eager."""
    embedder = transformer.time_text_embed
    embedder.forward = torch.compiler.disable(embedder.forward, recursive=True)
    transformer.compile(mode=None if mode == "default" else mode)
