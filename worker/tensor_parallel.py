"""Tensor parallelism of the text encoder within a worker group (``--tp-size``).

FLUX.1's T5-XXL encoder (4.7B parameters, 9.5 GB in bf16) is held whole by every rank unless it is
sharded: Megatron-style, each block's query/key/value and gated-FFN input projections are split by
output features (``ColwiseParallel``: each rank keeps whole attention heads) and the output
projections by input features (``RowwiseParallel``: one all-reduce per sub-layer). The relative
position bias, an embedding with one column per head, keeps the columns of the rank's heads. Each
rank then holds 1/tp of the encoder, and every rank still gets the full prompt embedding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from worker.parallel import ParallelError

log = logging.getLogger("fluxgate.parallel")


def tensor_parallel_mesh(tp: int, device: torch.device) -> Any:
    """The group's ranks as (replicas, tp): consecutive ranks share one text encoder."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("replica", "tp"))
    return mesh["tp"]


def apply_text_encoder_tp(pipe: Any, tp: int, device: torch.device) -> None:
    """Shard the pipeline's T5 encoder over ``tp`` ranks of the group (after it is on this rank's device)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import T5EncoderModel

    encoder = getattr(pipe, "text_encoder_2", None)
    if not isinstance(encoder, T5EncoderModel):
        found = type(encoder).__name__ if encoder is not None else "no second text encoder"
        raise ParallelError(f"--tp-size shards FLUX.1's T5 text encoder; this pipeline has {found}")
    heads, d_ff = int(encoder.config.num_heads), int(encoder.config.d_ff)
    if heads % tp or d_ff % tp:
        raise ParallelError(
            f"--tp-size {tp} must divide the text encoder's {heads} attention heads and {d_ff} FFN features"
        )
    mesh = tensor_parallel_mesh(tp, device)
    rank = mesh.get_local_rank()
    blocks: list[Any] = list(encoder.encoder.block)
    for block in blocks:
        attention = block.layer[0].SelfAttention
        plan = {
            "q": ColwiseParallel(),
            "k": ColwiseParallel(),
            "v": ColwiseParallel(),
            "o": RowwiseParallel(),
        }
        parallelize_module(attention, mesh, plan)
        attention.n_heads = heads // tp
        attention.inner_dim = attention.n_heads * attention.key_value_proj_dim
        if attention.has_relative_attention_bias:
            _keep_heads(attention.relative_attention_bias, rank * attention.n_heads, attention.n_heads)
        feed_forward = block.layer[1].DenseReluDense
        inputs = [name for name in ("wi", "wi_0", "wi_1") if hasattr(feed_forward, name)]
        parallelize_module(
            feed_forward, mesh, {**{name: ColwiseParallel() for name in inputs}, "wo": RowwiseParallel()}
        )
    log.info("text encoder sharded over %d ranks (%d heads each)", tp, heads // tp)


def _keep_heads(bias: nn.Embedding, first: int, count: int) -> None:
    """The relative position bias has one column per head: keep this rank's columns."""
    with torch.no_grad():
        bias.weight = nn.Parameter(bias.weight[:, first : first + count].clone(), requires_grad=False)
    bias.embedding_dim = count
