"""FLUX.1 attention's query/key RMSNorm, rotary embedding and head-major layout in one pass (``--compile``).

On an H100 the compiled single blocks spend 0.132 s an image in the kernel inductor fuses from the
query/key RMSNorm, the rotary embedding and the layout SDPA reads (1,064 calls at ~0.9 TB/s: a third
of the card's memory rate), and the double blocks another ~0.07 s concatenating text and image tokens
around the same work (docs/performance.md, lease 22). ``fluxgate::qk_norm_rope`` does it in one read and
one write of each projection: the text tokens (if any) and the image tokens, each normed with its own
weight, rotated, and written straight into the (batch, heads, tokens, head_dim) layout SDPA takes.

It rounds where eager rounds (``torch.nn.RMSNorm``'s weighted result, then the rotation's fp32 result),
so it gives the processor's output up to fp32 summation order. On CUDA it is a Triton kernel; elsewhere
the op runs the same math in PyTorch. ``apply_fused_qk_norm_rope`` sets a processor that calls it; the
compiled engine does so on one GPU (``worker.engine.compile_for_speed``; measured in docs/performance.md,
lease 25). Set before a sequence-parallel layout (``bench.parallel --qk-rope``), the processor runs the
layout's exchange through diffusers' dispatch, synchronously: it replaces the processor cache-dit's async
Ulysses patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

try:  # shipped with CUDA builds of torch; absent from CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def reference(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    """FLUX attention's ``torch.nn.RMSNorm`` on each part, their concatenation and ``apply_rotary_emb``,
    head-major."""
    parts = []
    for tokens, weight in ((text, text_weight), (image, image_weight)):
        if tokens.shape[1]:
            parts.append(F.rms_norm(tokens.unflatten(-1, (-1, head_dim)), (head_dim,), weight, eps))
    rotated: torch.Tensor = apply_rotary_emb(torch.cat(parts, dim=1), (cos, sin), sequence_dim=1)  # type: ignore[arg-type, assignment]
    return rotated.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("fluxgate::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    """(batch, text + image tokens, heads, head_dim), stored head-major: SDPA's layout after a transpose."""
    if image.is_cuda and triton is not None and head_dim & (head_dim - 1) == 0:  # tl.arange: powers of two
        return _triton_qk_norm_rope(text, text_weight, image, image_weight, cos, sin, eps, head_dim)
    return reference(text, text_weight, image, image_weight, cos, sin, eps, head_dim)


@qk_norm_rope.register_fake
def _(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    return head_major(image, text.shape[1] + image.shape[1], head_dim)


def head_major(like: torch.Tensor, tokens: int, head_dim: int) -> torch.Tensor:
    batch, heads = like.shape[0], like.shape[-1] // head_dim
    strides = (heads * tokens * head_dim, head_dim, tokens * head_dim, 1)
    return like.new_empty_strided((batch, tokens, heads, head_dim), strides)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        text_ptr,
        text_weight_ptr,
        image_ptr,
        image_weight_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        text_tokens,
        tokens,
        heads,
        eps,
        text_batch_stride,
        text_token_stride,
        image_batch_stride,
        image_token_stride,
        HEAD_DIM: tl.constexpr,
        GROUP_HEADS: tl.constexpr,
    ):
        """One program per (batch, token, group of heads): the heads' rows loaded whole, normed, rotated in
        pairs (``x * cos + stack(-odd, even) * sin``, as ``apply_rotary_emb``), written head-major."""
        row = tl.program_id(0)
        batch = row // tokens
        token = row % tokens
        head = tl.program_id(1) * GROUP_HEADS + tl.arange(0, GROUP_HEADS)[:, None]
        dim = tl.arange(0, HEAD_DIM)[None, :]
        if token < text_tokens:
            source = text_ptr + batch * text_batch_stride + token * text_token_stride
            weight_ptr = text_weight_ptr
        else:
            source = image_ptr + batch * image_batch_stride + (token - text_tokens) * image_token_stride
            weight_ptr = image_weight_ptr
        dtype = out_ptr.dtype.element_ty
        x = tl.load(source + head * HEAD_DIM + dim).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        # torch's RMSNorm scales and weighs in fp32 and rounds once; the rotation then reads that value
        x = (x * scale * tl.load(weight_ptr + dim).to(tl.float32)).to(dtype).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (GROUP_HEADS, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (GROUP_HEADS, HEAD_DIM))
        angle = token * HEAD_DIM + dim
        out = x * tl.load(cos_ptr + angle) + rotated * tl.load(sin_ptr + angle)
        tl.store(out_ptr + (batch * heads + head) * tokens * HEAD_DIM + angle, out.to(dtype))


def group_heads(heads: int) -> int:
    """Heads per program: the largest power of two up to 8 that divides ``heads`` (FLUX.1's 24: 8)."""
    group = 8
    while heads % group:
        group //= 2
    return group


def _triton_qk_norm_rope(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    text_tokens = text.shape[1]
    tokens = text_tokens + image.shape[1]
    out = head_major(image, tokens, head_dim)
    heads = out.shape[2]
    if text_tokens == 0:  # the kernel never reads it; any pointer of the right type will do
        text, text_weight = image, image_weight
    for part in (text, image):
        if part.stride(-1) != 1:
            raise ValueError("qk_norm_rope needs each token's features contiguous")
    group = group_heads(heads)
    _qk_norm_rope_kernel[(out.shape[0] * tokens, heads // group)](
        text,
        text_weight.contiguous(),
        image,
        image_weight.contiguous(),
        cos.float().contiguous(),
        sin.float().contiguous(),
        out,
        text_tokens,
        tokens,
        heads,
        eps,
        text.stride(0),
        text.stride(1),
        image.stride(0),
        image.stride(1),
        HEAD_DIM=head_dim,
        GROUP_HEADS=group,
    )
    return out


def normed_rotated(
    attn: Any, text: torch.Tensor | None, image: torch.Tensor, which: str, rope: Any
) -> torch.Tensor:
    """``qk_norm_rope`` for the query (``which`` "q") or key ("k") of ``attn``, text tokens first."""
    image_norm = getattr(attn, f"norm_{which}")
    text_norm = getattr(attn, f"norm_added_{which}") if text is not None else image_norm
    text = image[:, :0] if text is None else text
    cos, sin = rope
    return qk_norm_rope(
        text, text_norm.weight, image, image_norm.weight, cos, sin, image_norm.eps, attn.head_dim
    )


class FusedQKFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' FLUX processor with ``qk_norm_rope`` in place of its norms, concatenation and rotation."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        if image_rotary_emb is None or attention_mask is not None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        joint = attn.added_kv_proj_dim is not None
        query = normed_rotated(attn, text_query if joint else None, query, "q", image_rotary_emb)
        key = normed_rotated(attn, text_key if joint else None, key, "k", image_rotary_emb)
        value = torch.cat([text_value, value], dim=1) if joint else value
        value = value.unflatten(-1, (-1, attn.head_dim))
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def weighted_norms_with_one_eps(attn: Any) -> bool:
    """The kernel takes one epsilon and a weight for each of the attention's query/key norms."""
    names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    norms = [getattr(attn, name) for name in names if getattr(attn, name, None) is not None]
    eps = attn.norm_q.eps
    weighted = all(getattr(norm, "weight", None) is not None for norm in norms)
    return weighted and eps is not None and all(norm.eps == eps for norm in norms)


def apply_fused_qk_norm_rope(transformer: Any) -> int:
    """Give every FLUX.1 attention the fused processor; returns how many changed.

    Call it before a sequence-parallel layout is applied: processors that already carry a parallel config,
    or of another class (IP-Adapter's), keep theirs, as do norms without weights or with different epsilons.
    """
    changed = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is not FluxAttnProcessor or processor._parallel_config is not None:
            continue
        if not weighted_norms_with_one_eps(module):
            continue
        fused = FusedQKFluxAttnProcessor()
        fused._attention_backend = processor._attention_backend
        module.processor = fused
        changed += 1
    return changed
