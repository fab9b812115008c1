"""FLUX.1's query, key and value projections as one GEMM per stream, over one buffer of their weights.

The fused processor (``worker.optimizations.qk_norm_rope``) projects the query, key and value with three
GEMMs per stream, and concatenates the double blocks' text and image values for their joint attention (one
28 MB copy a double block). Here each stream's three weights (and biases) are stored as one buffer that the
three ``nn.Linear`` modules keep as views (``fuse_qkv_weights``): no memory is added, the state dict and the
modules are unchanged, and an in-place change to a weight (``load_state_dict``) reaches the buffer. The
processor then projects each stream with one GEMM (``projected_qkv``): a double block's text and image GEMMs
write their rows of one (batch, text + image tokens, 3 x features) buffer (``joint_value.linear_into``), so
the joint value is a view of it and the query and key reach the norm-and-rotate kernel as views too.

diffusers' ``fuse_qkv_projections`` makes one GEMM per stream as well, but copies the weights (4 GB more on
an H100, lease 2) and leaves the processor to split and concatenate (lease 51: the GEMMs 24 ms an image
faster, the image not). Measured: docs/performance.md, nineteenth session.

Where: ``--compile``'s fused processor on one GPU, for plain biased ``nn.Linear`` projections of one dtype
(``plain_linear``: fp8 or sharded weights and hooked layers keep three GEMMs). A weight assigned anew after
loading (a new ``Parameter``, not an in-place copy) breaks the views: ``fused_buffers`` then refuses the
module and the processor projects the three as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from worker.optimizations.epilogues import plain_linear
from worker.optimizations.joint_value import linear_into
from worker.optimizations.quack_projection import quack_linear_into

# each stream's projections, in the order their rows sit in the stream's buffer
STREAMS = {"image": ("to_q", "to_k", "to_v"), "text": ("add_q_proj", "add_k_proj", "add_v_proj")}

Parts = tuple[torch.Tensor | None, torch.Tensor]  # a projection's text tokens (None: none) and image tokens


class Projections(NamedTuple):
    """An attention's query, key and value, each as (text tokens, image tokens); ``query_key``, where the
    query's features and then the key's sit side by side in one output (this module's GEMMs), the same
    tokens over both, for a kernel that norms and rotates the two in one pass."""

    query: Parts
    key: Parts
    value: Parts
    query_key: Parts | None = None


def buffer_names(stream: str) -> tuple[str, str]:
    return f"fused_{stream}_qkv_weight", f"fused_{stream}_qkv_bias"


def fusable(linears: list[Any]) -> bool:
    """Plain biased ``nn.Linear`` layers of one shape, dtype and device: one GEMM can do them, and its output
    splits in equal thirds (``projected_qkv``)."""
    if not all(plain_linear(linear) for linear in linears):
        return False
    first = linears[0].weight
    return all(
        linear.in_features == linears[0].in_features
        and linear.out_features == linears[0].out_features
        and linear.weight.dtype == first.dtype
        and linear.weight.device == first.device
        and linear.bias.dtype == first.dtype
        for linear in linears
    )


def fuse_stream(attn: nn.Module, stream: str) -> bool:
    """Store one stream's three weights and biases as one buffer each, the layers' parameters its views."""
    found = [getattr(attn, name, None) for name in STREAMS[stream]]
    linears: list[Any] = [linear for linear in found if linear is not None]
    if len(linears) < len(found) or not fusable(linears):
        return False
    weight_name, bias_name = buffer_names(stream)
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.cat([linear.bias for linear in linears])
    start, views = 0, []
    for linear in linears:
        end = start + linear.out_features
        linear.weight = nn.Parameter(weight[start:end], requires_grad=linear.weight.requires_grad)
        linear.bias = nn.Parameter(bias[start:end], requires_grad=linear.bias.requires_grad)
        views.append((linear.weight, linear.bias))
        start = end
    attn.register_buffer(weight_name, weight, persistent=False)
    attn.register_buffer(bias_name, bias, persistent=False)
    # a plain attribute (a tuple is no submodule or parameter): what ``fused_buffers`` checks against
    vars(attn)[f"fused_{stream}_qkv_views"] = tuple(views)
    return True


def fuse_qkv_weights(attn: nn.Module) -> bool:
    """Fuse ``attn``'s image stream and, where it has one, its text stream; whether the module now projects
    each stream with one GEMM (a text stream that cannot fuse leaves the module unfused, its image stream's
    buffer dropped: the layers keep their views as ordinary parameters)."""
    if getattr(attn, "fused_projections", False) or not fuse_stream(attn, "image"):
        return False
    if getattr(attn, "add_q_proj", None) is None or fuse_stream(attn, "text"):
        return True
    for name in (*buffer_names("image"), "fused_image_qkv_views"):  # the views stay valid parameters
        delattr(attn, name)
    return False


def fused_buffers(attn: Any, stream: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A stream's fused weight and bias, where ``fuse_qkv_weights`` made them and the layers still hold the
    parameters it made (identity, which the compiler guards on: no storage pointers read while tracing)."""
    weight_name, bias_name = buffer_names(stream)
    weight, bias = getattr(attn, weight_name, None), getattr(attn, bias_name, None)
    views: Any = getattr(attn, f"fused_{stream}_qkv_views", None)
    if weight is None or bias is None or views is None:
        return None
    for name, (weight_view, bias_view) in zip(STREAMS[stream], views, strict=True):
        linear = getattr(attn, name)
        if not plain_linear(linear) or linear.weight is not weight_view or linear.bias is not bias_view:
            return None
    return weight, bias


def projected_qkv(
    attn: Any, hidden_states: torch.Tensor, text: torch.Tensor | None, quack: bool = False
) -> Projections | None:
    """The query, key and value as (text, image) parts, views of one GEMM's output per stream, and the
    query and key together; the value whole (text tokens first) as its image part. ``None`` where the
    module's weights are not fused. ``quack``: a double block's image stream projects with quack's GEMM
    (``quack_projection``)."""
    if getattr(attn, "fused_projections", False):  # diffusers' own ``to_qkv`` (a benchmark's variant)
        return None
    image = fused_buffers(attn, "image")
    joint_text = fused_buffers(attn, "text") if text is not None else None
    if image is None or (text is not None and joint_text is None):
        return None
    width = image[0].shape[0] // 3
    if text is None or joint_text is None:
        out = F.linear(hidden_states, *image)
        query, key, value = (out[..., index * width : (index + 1) * width] for index in range(3))
        return Projections((None, query), (None, key), (None, value), (None, out[..., : 2 * width]))
    text_tokens = text.shape[1]
    joint = hidden_states.new_empty(hidden_states.shape[0], text_tokens + hidden_states.shape[1], 3 * width)
    linear_into(joint[:, :text_tokens], text, *joint_text)
    (quack_linear_into if quack else linear_into)(joint[:, text_tokens:], hidden_states, *image)
    query, key, value, query_key = (
        joint[..., start * width : end * width] for start, end in ((0, 1), (1, 2), (2, 3), (0, 2))
    )
    query_parts, key_parts, query_key_parts = (
        (part[:, :text_tokens], part[:, text_tokens:]) for part in (query, key, query_key)
    )
    return Projections(query_parts, key_parts, (None, value), query_key_parts)


def apply_fused_qkv(transformer: nn.Module, processor_class: type) -> int:
    """Fuse the projections of every attention whose processor is exactly a ``processor_class`` (the fused
    processor, not a subclass with projections of its own such as fp8's: call after
    ``apply_fused_qk_norm_rope``, on a transformer placed for good); returns how many."""
    changed = 0
    for module in transformer.modules():
        if type(getattr(module, "processor", None)) is processor_class and fuse_qkv_weights(module):
            changed += 1
    return changed
