"""Tensor parallelism within a worker group: the text encoder (``--tp-size``) and the transformer
(``--dit-tp-size``).

FLUX.1's T5-XXL encoder (4.7B parameters, 9.5 GB in bf16) and FLUX.2's Mistral Small (24B, 48 GB)
are held whole by every rank unless they are sharded. Megatron-style: the query/key/value and the
MLP's input projections are split by output features (column parallel: each rank keeps whole
attention heads), the output projections by input features (row parallel: one all-reduce per
sub-layer). T5's relative position bias, an embedding with one column per head, keeps the columns
of the rank's heads. Each rank then holds 1/tp of the encoder, and every rank still gets the full
prompt embedding.

The transformer follows its own diffusers ``_tp_plan`` (FLUX.1 and FLUX.2 both have one): the same
column/row pairs, plus packed projections whose fused blocks (FLUX.2's Q, K, V, gate and up in one
linear) are each split, so every rank's slice keeps the blocks in proportion; diffusers' attention
processors reshape by head size, so they run on a rank's heads unchanged. Modulation, embedders and
norms stay whole on every rank.

The shards are plain tensors in plain ``nn.Linear`` layers, and the all-reduce is a forward hook on
each row-parallel layer. torch's ``parallelize_module`` (DTensor) did the same math, but its
per-call dispatch cost FLUX.2's 40-layer Mistral 0.65-1.05 s per prompt on 2xH200 (the GEMMs are
~20 ms): eager DTensor overhead, not compute. Every rank loads the same weights, so each one slices
its own shard; nothing is scattered.
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


def sharded_text_encoder(pipe: Any) -> str:
    """The component ``--tp-size`` shards: FLUX.1's T5 (``text_encoder_2``) or FLUX.2's Mistral
    (``text_encoder``)."""
    from transformers import T5EncoderModel

    if isinstance(getattr(pipe, "text_encoder_2", None), T5EncoderModel):
        return "text_encoder_2"
    if type(getattr(pipe, "text_encoder", None)).__name__ == "Mistral3ForConditionalGeneration":
        return "text_encoder"
    raise ParallelError(
        f"--tp-size shards FLUX.1's T5 or FLUX.2's Mistral text encoder; {type(pipe).__name__} has neither"
    )


def apply_text_encoder_tp(pipe: Any, tp: int, device: torch.device) -> None:
    """Shard the pipeline's large text encoder over ``tp`` ranks of the group and place it on this
    rank's device.

    The encoder may still be on the CPU (the engine leaves it there): only this rank's slice of each
    sharded weight is copied to the GPU; the unsharded rest (embeddings, norms, FLUX.2's vision
    tower) moves afterwards. The GPU never holds the whole encoder, which for FLUX.2
    (48 GB) would not fit beside its transformer on an 80 GB card.
    """
    name = sharded_text_encoder(pipe)
    encoder = getattr(pipe, name)
    if name == "text_encoder_2":
        _shard_t5(encoder, tp, device)
    else:
        _shard_mistral(encoder, tp, device)
    encoder.to(device)


def _shard_t5(encoder: Any, tp: int, device: torch.device) -> None:
    heads, d_ff = int(encoder.config.num_heads), int(encoder.config.d_ff)
    _check_divides(tp, {"attention heads": heads, "FFN features": d_ff})
    mesh = tensor_parallel_mesh(tp, device)
    rank = mesh.get_local_rank()
    blocks: list[Any] = list(encoder.encoder.block)
    for block in blocks:
        attention = block.layer[0].SelfAttention
        _parallelize(attention, mesh, device, columns=("q", "k", "v"), rows=("o",))
        attention.n_heads = heads // tp
        attention.inner_dim = attention.n_heads * attention.key_value_proj_dim
        if attention.has_relative_attention_bias:
            _keep_heads(attention.relative_attention_bias, rank * attention.n_heads, attention.n_heads)
        feed_forward = block.layer[1].DenseReluDense
        inputs = tuple(name for name in ("wi", "wi_0", "wi_1") if hasattr(feed_forward, name))
        _parallelize(feed_forward, mesh, device, columns=inputs, rows=("wo",))
    log.info("T5 text encoder sharded over %d ranks (%d heads each)", tp, heads // tp)


def _shard_mistral(encoder: Any, tp: int, device: torch.device) -> None:
    """Mistral's decoder layers (the vision tower stays whole): attention reshapes by head size, so
    each rank's projections simply carry fewer heads; grouped key/value heads split the same way."""
    text = encoder.config.text_config
    _check_divides(
        tp,
        {
            "attention heads": int(text.num_attention_heads),
            "key/value heads": int(text.num_key_value_heads),
            "MLP features": int(text.intermediate_size),
        },
    )
    mesh = tensor_parallel_mesh(tp, device)
    layers: list[Any] = list(encoder.model.language_model.layers)
    for layer in layers:
        _parallelize(layer.self_attn, mesh, device, columns=("q_proj", "k_proj", "v_proj"), rows=("o_proj",))
        _parallelize(layer.mlp, mesh, device, columns=("gate_proj", "up_proj"), rows=("down_proj",))
    log.info("Mistral text encoder sharded over %d ranks", tp)


def apply_transformer_tp(pipe: Any, tp: int, device: torch.device) -> None:
    """Shard the transformer over ``tp`` ranks by its diffusers ``_tp_plan`` and place it on this rank's
    device, copying only this rank's slices (the engine leaves the transformer where it was loaded)."""
    from diffusers.hooks.tensor_parallel import resolve_tp_shard_specs

    transformer = pipe.transformer
    plan = getattr(transformer, "_tp_plan", None)
    if not plan:
        raise ParallelError(f"--dit-tp-size: {type(transformer).__name__} has no tensor-parallel plan")
    heads = int(transformer.config.num_attention_heads)
    if heads % tp:
        raise ParallelError(f"--dit-tp-size {tp} must divide the transformer's {heads} attention heads")
    try:
        specs = resolve_tp_shard_specs(transformer, plan, tp)
    except ValueError as error:
        raise ParallelError(f"--dit-tp-size {tp}: {error}") from error
    mesh = tensor_parallel_mesh(tp, device)
    paths = sorted({name.rsplit(".", 1)[0] for name in specs})
    for path in paths:
        spec = specs[f"{path}.weight"]
        assert spec.dim is not None and spec.block_sizes is not None  # only a row-parallel bias is unsharded
        _shard_linear(transformer.get_submodule(path), spec.dim, spec.block_sizes, mesh, device)
    transformer.to(device)
    log.info("transformer sharded over %d ranks (%d linear layers)", tp, len(paths))


def _shard_linear(
    linear: nn.Linear, dim: int, block_sizes: list[int], mesh: Any, device: torch.device
) -> None:
    """Keep this rank's 1/tp of each block of a linear's output features (``dim`` 0, column parallel) or
    input features (1, row parallel: an all-reduce after it, then the bias), copied to ``device`` on
    their own (the whole weight never goes there)."""
    rank, tp = mesh.get_local_rank(), mesh.size()
    bias = None
    if linear.bias is not None and dim == 1:  # added once, after the partial sums are reduced
        bias = linear.bias.detach().to(device)
        linear.register_parameter("bias", None)
    with torch.no_grad():
        weight = _blocks_slice(linear.weight, dim, block_sizes, rank, tp, device)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            local_bias = _blocks_slice(linear.bias, 0, block_sizes, rank, tp, device)
            linear.bias = nn.Parameter(local_bias, requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape
    if dim == 1:
        linear.register_forward_hook(_all_reduce_hook(mesh.get_group(), bias))


def _blocks_slice(
    tensor: torch.Tensor, dim: int, block_sizes: list[int], rank: int, tp: int, device: torch.device
) -> torch.Tensor:
    """This rank's 1/tp of each block of ``tensor`` along ``dim``, concatenated, copied to ``device``."""
    parts, offset = [], 0
    for size in block_sizes:
        chunk = size // tp
        parts.append(_own_copy(tensor.narrow(dim, offset + rank * chunk, chunk), device))
        offset += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _check_divides(tp: int, sizes: dict[str, int]) -> None:
    uneven = [f"{size} {name}" for name, size in sizes.items() if size % tp]
    if uneven:
        raise ParallelError(f"--tp-size {tp} must divide the text encoder's {', '.join(uneven)}")


def _parallelize(
    module: nn.Module, mesh: Any, device: torch.device, columns: tuple[str, ...], rows: tuple[str, ...]
) -> None:
    """Megatron's pair: inputs split by output features (column parallel), outputs by input features
    (row parallel, then one all-reduce of the partial sums)."""
    for names, dim in ((columns, 0), (rows, 1)):
        for name in names:
            linear = getattr(module, name)
            _shard_linear(linear, dim, [linear.weight.shape[dim]], mesh, device)


def _own_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy that does not keep the whole weight's storage alive."""
    return tensor.to(device=device, copy=True).contiguous()


def _all_reduce_hook(group: Any, bias: torch.Tensor | None) -> Any:
    import torch.distributed as dist

    def reduce(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output if bias is None else output + bias

    return reduce


def _keep_heads(bias: nn.Embedding, first: int, count: int) -> None:
    """The relative position bias has one column per head: keep this rank's columns."""
    with torch.no_grad():
        bias.weight = nn.Parameter(bias.weight[:, first : first + count].clone(), requires_grad=False)
    bias.embedding_dim = count
