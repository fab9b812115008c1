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
compiled engine does so on one GPU (measured in docs/performance.md, lease 25) and in Ulysses groups on
diffusers' runtime (lease 57; ``worker.engine.fuses_qk``). Set before a sequence-parallel layout, the
processor runs the layout's exchange synchronously: under Ulysses alone its own, with the query, key and
value in one all-to-all (``worker.optimizations.ulysses``), otherwise diffusers' dispatch. On cache-dit's
runtime it would replace the processor async Ulysses patches.

Where one GEMM wrote the query's and key's features side by side (``worker.optimizations.fused_qkv``),
``fluxgate::qk_pair_norm_rope`` norms and rotates both in one launch of the same kernel: a program's group
of heads is the query's or the key's, and takes that one's norm weights. Its outputs are what the two
calls give, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from worker.optimizations.epilogues import plain_linear
from worker.optimizations.fa4_attention import fa4_attention, takes
from worker.optimizations.fa4_waves import fa4_attention_waves, planned
from worker.optimizations.fp8_attention import E4M3_MAX
from worker.optimizations.fused_qkv import Projections, projected_qkv
from worker.optimizations.joint_value import joint_value
from worker.optimizations.symmetric_exchange import power_of_two_divisor, symmetric_exchange_applies
from worker.optimizations.ulysses import PendingAttention, packed_exchange_applies, packed_ulysses_attention

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
    fp8_scale: torch.Tensor | None = None,
    token_major: bool = False,
) -> torch.Tensor:
    """FLUX attention's ``torch.nn.RMSNorm`` on each part, their concatenation and ``apply_rotary_emb``,
    head-major (or token-major); with ``fp8_scale``, that result times the scale, rounded to e4m3."""
    parts = []
    for tokens, weight in ((text, text_weight), (image, image_weight)):
        if tokens.shape[1]:
            parts.append(F.rms_norm(tokens.unflatten(-1, (-1, head_dim)), (head_dim,), weight, eps))
    rotated: torch.Tensor = apply_rotary_emb(torch.cat(parts, dim=1), (cos, sin), sequence_dim=1)  # type: ignore[arg-type, assignment]
    if fp8_scale is not None:
        rotated = (rotated.float() * fp8_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    if token_major:
        return rotated.contiguous()
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
    fp8_scale: torch.Tensor | None = None,
    token_major: bool = False,
) -> torch.Tensor:
    """(batch, text + image tokens, heads, head_dim), stored head-major: SDPA's layout after a transpose;
    ``token_major``: stored as indexed, each token's heads side by side (the projections' layout, which
    cuDNN's attention also reads and then writes its output in: no copy before the output projection).

    With ``fp8_scale`` (a one-element fp32 tensor) the output is e4m3: the bf16 result times the scale.
    """
    if image.is_cuda and triton is not None and head_dim & (head_dim - 1) == 0:  # tl.arange: powers of two
        return _triton_qk_norm_rope(
            text, text_weight, image, image_weight, cos, sin, eps, head_dim, fp8_scale, token_major
        )
    return reference(text, text_weight, image, image_weight, cos, sin, eps, head_dim, fp8_scale, token_major)


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
    fp8_scale: torch.Tensor | None = None,
    token_major: bool = False,
) -> torch.Tensor:
    dtype = torch.float8_e4m3fn if fp8_scale is not None else image.dtype
    return qk_output(image, text.shape[1] + image.shape[1], head_dim, dtype, token_major)


def qk_output(
    like: torch.Tensor, tokens: int, head_dim: int, dtype: torch.dtype, token_major: bool
) -> torch.Tensor:
    """The op's (batch, tokens, heads, head_dim) output, stored head-major or token-major."""
    shape, strides = qk_layout(like.shape[0], tokens, like.shape[-1] // head_dim, head_dim, token_major)
    return like.new_empty_strided(shape, strides, dtype=dtype)


def qk_layout(
    batch: int, tokens: int, heads: int, head_dim: int, token_major: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch, tokens, heads, head_dim) and its strides, head-major or token-major."""
    if token_major:
        strides = (tokens * heads * head_dim, heads * head_dim, head_dim, 1)
    else:
        strides = (heads * tokens * head_dim, head_dim, tokens * head_dim, 1)
    return (batch, tokens, heads, head_dim), strides


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        text_ptr,
        text_weight_ptr,
        text_key_weight_ptr,
        image_ptr,
        image_weight_ptr,
        image_key_weight_ptr,
        cos_ptr,
        sin_ptr,
        fp8_scale_ptr,
        out_ptr,
        text_tokens,
        tokens,
        heads,
        key_offset,
        eps,
        text_batch_stride,
        text_token_stride,
        image_batch_stride,
        image_token_stride,
        HEAD_DIM: tl.constexpr,
        GROUP_HEADS: tl.constexpr,
        TOKENS: tl.constexpr,
        FP8: tl.constexpr,
        TOKEN_MAJOR: tl.constexpr,
        PAIR: tl.constexpr,
    ):
        """One program per (batch, ``TOKENS`` tokens, group of heads): each token's heads loaded whole from
        the text or the image part, normed, rotated in pairs (``x * cos + stack(-odd, even) * sin``, as
        ``apply_rotary_emb``), written head-major (or token-major); with ``FP8``, the rounded result scaled
        and rounded again to e4m3.

        With ``PAIR`` the parts hold the query's ``heads`` and then the key's: a program whose heads are the
        key's norms them with the key weights and writes them ``key_offset`` elements further on."""
        batch = tl.program_id(2)
        token = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)[:, None, None]
        first = tl.program_id(1) * GROUP_HEADS
        key = 0  # 1 in a program of the key's heads (a group is the query's or the key's)
        if PAIR:
            key = (first >= heads).to(tl.int32)
        head = first - key * heads + tl.arange(0, GROUP_HEADS)[None, :, None]
        dim = tl.arange(0, HEAD_DIM)[None, None, :]
        valid = token < tokens
        text_row = token < text_tokens
        features = (first + tl.arange(0, GROUP_HEADS)[None, :, None]) * HEAD_DIM + dim
        text_at = text_ptr + batch * text_batch_stride + token * text_token_stride + features
        image_at = (
            image_ptr + batch * image_batch_stride + (token - text_tokens) * image_token_stride + features
        )
        x = tl.where(
            text_row,
            tl.load(text_at, mask=valid & text_row, other=0.0),
            tl.load(image_at, mask=valid & (token >= text_tokens), other=0.0),
        ).to(tl.float32)
        dtype = image_ptr.dtype.element_ty
        weight = tl.where(text_row, tl.load(text_weight_ptr + dim), tl.load(image_weight_ptr + dim))
        if PAIR:
            text_key_weight = tl.load(text_key_weight_ptr + dim)
            key_weight = tl.where(text_row, text_key_weight, tl.load(image_key_weight_ptr + dim))
            weight = tl.where(key != 0, key_weight, weight)
        scale = tl.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)[:, :, None]
        x = (x * scale * weight.to(tl.float32)).to(dtype).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (TOKENS, GROUP_HEADS, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-odd, even), (TOKENS, GROUP_HEADS, HEAD_DIM))
        angle = token * HEAD_DIM + dim
        cos = tl.load(cos_ptr + angle, mask=valid, other=0.0)
        out = (x * cos + rotated * tl.load(sin_ptr + angle, mask=valid, other=0.0)).to(dtype)
        if FP8:
            scaled = out.to(tl.float32) * tl.load(fp8_scale_ptr)
            out = tl.clamp(scaled, -448.0, 448.0).to(out_ptr.dtype.element_ty)  # e4m3's range
        if TOKEN_MAJOR:
            at = ((batch * tokens + token) * heads + head) * HEAD_DIM + dim
        else:
            at = (batch * heads + head) * tokens * HEAD_DIM + angle
        if PAIR:
            at += key * key_offset
        tl.store(out_ptr + at, out, mask=valid)


# Tokens a program of the Triton kernel takes (a power of two). Four: 0.069 s an image against 0.081 s with
# one (lease 53, docs/performance.md); the benchmark's ``*-qk-tokens-*`` variants set others.
TOKENS_PER_PROGRAM = 4


def group_heads(heads: int) -> int:
    """Heads per program: the largest power of two up to 8 that divides ``heads`` (FLUX.1's 24: 8)."""
    return power_of_two_divisor(heads, 8)


def _triton_qk_norm_rope(
    text: torch.Tensor,
    text_weight: torch.Tensor,
    image: torch.Tensor,
    image_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
    fp8_scale: torch.Tensor | None,
    token_major: bool,
) -> torch.Tensor:
    tokens = text.shape[1] + image.shape[1]
    dtype = torch.float8_e4m3fn if fp8_scale is not None else image.dtype
    out = qk_output(image, tokens, head_dim, dtype, token_major)
    weights = ((text_weight, text_weight), (image_weight, image_weight))
    _launch(text, image, weights, cos, sin, eps, head_dim, fp8_scale, token_major, out, key_offset=None)
    return out


def _launch(
    text: torch.Tensor,
    image: torch.Tensor,
    weights: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
    fp8_scale: torch.Tensor | None,
    token_major: bool,
    out: torch.Tensor,
    key_offset: int | None,
) -> None:
    """The kernel over ``out`` (batch, tokens, heads, head_dim); ``weights``: the text's and the image's
    (query, key) norm weights. ``key_offset`` (elements of ``out``'s storage): the parts hold the query's
    heads and then the key's, whose results go that far after the query's."""
    text_tokens, tokens, heads = text.shape[1], out.shape[1], out.shape[2]
    (text_weight, text_key_weight), (image_weight, image_key_weight) = weights
    if text_tokens == 0:  # the kernel never reads it; any pointer of the right type will do
        text, text_weight, text_key_weight = image, image_weight, image_key_weight
    for part in (text, image):
        if part.stride(-1) != 1:
            raise ValueError("qk_norm_rope needs each token's features contiguous")
    group = group_heads(heads)
    pairs = 1 if key_offset is None else 2
    grid = (triton.cdiv(tokens, TOKENS_PER_PROGRAM), pairs * heads // group, out.shape[0])
    _qk_norm_rope_kernel[grid](
        text,
        text_weight.contiguous(),
        text_key_weight.contiguous(),
        image,
        image_weight.contiguous(),
        image_key_weight.contiguous(),
        cos.float().contiguous(),
        sin.float().contiguous(),
        fp8_scale.float() if fp8_scale is not None else cos,  # never read without FP8
        out,
        text_tokens,
        tokens,
        heads,
        key_offset or 0,
        eps,
        text.stride(0),
        text.stride(1),
        image.stride(0),
        image.stride(1),
        HEAD_DIM=head_dim,
        GROUP_HEADS=group,
        TOKENS=TOKENS_PER_PROGRAM,
        FP8=fp8_scale is not None,
        TOKEN_MAJOR=token_major,
        PAIR=key_offset is not None,
    )


def pair_reference(
    text: torch.Tensor,
    text_weights: tuple[torch.Tensor, torch.Tensor],
    image: torch.Tensor,
    image_weights: tuple[torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
    token_major: bool,
) -> torch.Tensor:
    """``reference`` for the query (each part's first half of features) and the key (the second half),
    stacked: (2, batch, tokens, heads, head_dim)."""
    width = image.shape[-1] // 2
    halves = [
        reference(
            text[..., index * width : (index + 1) * width],
            text_weights[index],
            image[..., index * width : (index + 1) * width],
            image_weights[index],
            cos,
            sin,
            eps,
            head_dim,
            token_major=token_major,
        )
        for index in (0, 1)
    ]
    out = pair_output(image, text.shape[1] + image.shape[1], head_dim, token_major)
    for index, half in enumerate(halves):
        out[index].copy_(half)
    return out


@torch.library.custom_op("fluxgate::qk_pair_norm_rope", mutates_args=())
def qk_pair_norm_rope(
    text: torch.Tensor,
    text_query_weight: torch.Tensor,
    text_key_weight: torch.Tensor,
    image: torch.Tensor,
    image_query_weight: torch.Tensor,
    image_key_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
    token_major: bool = False,
) -> torch.Tensor:
    """``qk_norm_rope`` of the query and the key in one pass, from parts whose features are the query's
    and then the key's (views of the fused projection's output, ``worker.optimizations.fused_qkv``): (2,
    batch, tokens, heads, head_dim), the query at 0 and the key at 1, each stored as ``qk_norm_rope``
    stores it."""
    weights = (text_query_weight, text_key_weight), (image_query_weight, image_key_weight)
    if image.is_cuda and triton is not None and head_dim & (head_dim - 1) == 0:
        out = pair_output(image, text.shape[1] + image.shape[1], head_dim, token_major)
        _launch(text, image, weights, cos, sin, eps, head_dim, None, token_major, out[0], out.stride(0))
        return out
    return pair_reference(text, weights[0], image, weights[1], cos, sin, eps, head_dim, token_major)


@qk_pair_norm_rope.register_fake
def _(
    text: torch.Tensor,
    text_query_weight: torch.Tensor,
    text_key_weight: torch.Tensor,
    image: torch.Tensor,
    image_query_weight: torch.Tensor,
    image_key_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    head_dim: int,
    token_major: bool = False,
) -> torch.Tensor:
    return pair_output(image, text.shape[1] + image.shape[1], head_dim, token_major)


def pair_output(like: torch.Tensor, tokens: int, head_dim: int, token_major: bool) -> torch.Tensor:
    """Two of ``qk_output``'s outputs in one buffer, the query's then the key's, from parts holding both."""
    heads = like.shape[-1] // (2 * head_dim)
    shape, strides = qk_layout(like.shape[0], tokens, heads, head_dim, token_major)
    return like.new_empty_strided((2, *shape), (strides[0] * shape[0], *strides))


def normed_rotated(
    attn: Any,
    text: torch.Tensor | None,
    image: torch.Tensor,
    which: str,
    rope: Any,
    fp8_scale: torch.Tensor | None = None,
    token_major: bool = False,
) -> torch.Tensor:
    """``qk_norm_rope`` for the query (``which`` "q") or key ("k") of ``attn``, text tokens first."""
    image_norm, text_norm = qk_norms(attn, which, text is not None)
    text = image[:, :0] if text is None else text
    cos, sin = rope
    return qk_norm_rope(
        text,
        text_norm.weight,
        image,
        image_norm.weight,
        cos,
        sin,
        image_norm.eps,
        attn.head_dim,
        fp8_scale,
        token_major,
    )


def normed_rotated_pair(
    attn: Any, text: torch.Tensor | None, image: torch.Tensor, rope: Any, token_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``normed_rotated``'s query and key of ``attn`` from parts holding the query's features and then the
    key's, in one launch (``qk_pair_norm_rope``)."""
    joint = text is not None
    (image_query, text_query), (image_key, text_key) = (qk_norms(attn, which, joint) for which in "qk")
    cos, sin = rope
    pair = qk_pair_norm_rope(
        image[:, :0] if text is None else text,
        text_query.weight,
        text_key.weight,
        image,
        image_query.weight,
        image_key.weight,
        cos,
        sin,
        image_query.eps,
        attn.head_dim,
        token_major,
    )
    return pair[0], pair[1]


def qk_norms(attn: Any, which: str, joint: bool) -> tuple[Any, Any]:
    """The image tokens' and the text tokens' norm of the query ("q") or key ("k"); one if not ``joint``."""
    image_norm = getattr(attn, f"norm_{which}")
    return image_norm, getattr(attn, f"norm_added_{which}") if joint else image_norm


def joined(text: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
    return torch.cat([text, image], dim=1) if text is not None else image


class FusedQKFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' FLUX processor with ``qk_norm_rope`` in place of its norms, concatenation and rotation."""

    token_major = True  # the query and key's layout (``attend``); head-major, as before, is a benchmark's
    # the value projections write the joint value in place (a benchmark's; lease 65: no gain)
    joint_value = False
    # the query and key, where one GEMM wrote them side by side, normed and rotated in one launch
    # (``qk_pair_norm_rope``); off: a launch each, as before (a benchmark's)
    paired_qk = True
    # Ulysses groups: query, key and value in one exchange (``worker.optimizations.ulysses``): 1% off a
    # Ulysses-2 image on 2xH200, the same image (2.232 against 2.255 s, lease 68, docs/performance.md)
    packed_exchange = True
    # ...and those exchanges through symmetric memory, copied by the copy engines, not NCCL's all-to-all
    # (``worker.optimizations.symmetric_exchange``): a Ulysses-2 image 5% faster on 2xH200, the same image
    # (2.073 against 2.181 s, lease 74, docs/performance.md)
    symmetric_exchange = True
    # a single block may ask for its attention as a ``PendingAttention`` (``overlap=True``), whose
    # exchanges run beside its MLP's GEMMs (worker.optimizations.epilogues.EpilogueSingleBlock): 2.2% off
    # a Ulysses-2 image on 2xH200, the same image (2.053 against 2.099 s, lease 75, docs/performance.md)
    overlaps = True
    # the attention through FlashAttention-4's Hopper kernel (``worker.optimizations.fa4_attention``), where
    # the engine finds it can run (``use_fa4_attention``); SDPA's cuDNN kernel otherwise
    fa4 = False
    # ...and split where its tiles leave the last wave partly idle (``worker.optimizations.fa4_waves``): the
    # GPU's SM count, set by the engine (0: never split)
    fa4_wave_sms = 0
    # its call takes ``queries_from``: a single block's queries from that row on (the last single block's
    # image rows, ``worker.optimizations.epilogues.image_rows_last``)
    attends_query_rows = True
    # a double block's fused image-stream projection through quack's GEMM
    # (``worker.optimizations.quack_projection``; a benchmark's: no gain in the image, lease 118)
    quack_projection = False

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        overlap: bool = False,
        queries_from: int = 0,
    ) -> Any:
        if image_rotary_emb is None or attention_mask is not None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        projections = self._projections(attn, hidden_states, encoder_hidden_states)
        if queries_from:  # a single block's rows from ``queries_from`` on attend every row (one GPU)
            if self._parallel_config is not None or encoder_hidden_states is not None:
                raise ValueError("queries_from is for a single block on one GPU")
            q, k, v = self._inputs(attn, projections, image_rotary_emb)
            return self._local_attention()(q[:, queries_from:], k, v).flatten(2, 3).to(q.dtype)
        if overlap and encoder_hidden_states is None and self._overlapped(projections.query[1]):
            return self.attend_later(attn, projections, image_rotary_emb)
        hidden_states = self.attend(attn, projections, image_rotary_emb)
        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    def _projections(self, attn: Any, hidden_states: torch.Tensor, text: Any) -> Projections:
        """The query, key and value projections, each as (text tokens, image tokens); with fused weights
        (``worker.optimizations.fused_qkv``) or ``joint_value`` the value comes whole, as its "image" part
        (``joined`` takes it as it is), and with fused weights the query and key come together too."""
        fused = (
            None
            if self._parallel_config is not None
            else projected_qkv(attn, hidden_states, text, self.quack_projection)
        )
        if fused is not None:
            return fused
        text_value: Any = getattr(attn, "add_v_proj", None)
        joint = (
            self.joint_value and text is not None and text_value is not None and not attn.fused_projections
        )
        if joint and plain_linear(attn.to_v) and plain_linear(text_value):
            value = joint_value(text, hidden_states, text_value, attn.to_v)
            query = (attn.add_q_proj(text), attn.to_q(hidden_states))
            return Projections(query, (attn.add_k_proj(text), attn.to_k(hidden_states)), (None, value))
        q, k, v, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, text)
        if attn.added_kv_proj_dim is None:
            text_q = text_k = text_v = None
        return Projections((text_q, q), (text_k, k), (text_v, v))

    def _overlapped(self, image_query: torch.Tensor) -> bool:
        """A Ulysses layout whose exchanges go through symmetric memory: the ones a GEMM can hide."""
        return (
            self.packed_exchange
            and self.symmetric_exchange
            and packed_exchange_applies(self._parallel_config, None)
            and symmetric_exchange_applies(image_query)
        )

    def attend_later(self, attn: Any, projections: Projections, rope: Any) -> Any:
        """``attend``'s attention as a ``PendingAttention`` whose exchanges run beside the caller's GEMMs."""
        q, k, v = self._inputs(attn, projections, rope)
        return PendingAttention(q, k, v, self._parallel_config, self._local_attention(), symmetric=True)

    def attend(self, attn: Any, projections: Projections, rope: Any) -> torch.Tensor:
        """Attention over the (text, image) projections, text first: (batch, tokens, heads x head_dim)."""
        q, k, v = self._inputs(attn, projections, rope)
        if self.packed_exchange and packed_exchange_applies(self._parallel_config, None):
            symmetric = self.symmetric_exchange and symmetric_exchange_applies(q)
            out = packed_ulysses_attention(
                q, k, v, self._parallel_config, self._local_attention(), symmetric=symmetric
            )
        elif self._parallel_config is None:
            out = self._local_attention()(q, k, v)
        else:
            backend, layout = self._attention_backend, self._parallel_config
            out = dispatch_attention_fn(q, k, v, backend=backend, parallel_config=layout)
        return out.flatten(2, 3).to(q.dtype)

    def _inputs(
        self, attn: Any, projections: Projections, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query and key normed, rotated and written token-major, as the value already is: cuDNN's
        attention writes its output in the query's layout, so the output projection reads it without a
        copy (head-major, each layer copied its 28 MB output once: 57 copies a step). Where the two come
        side by side (``query_key``), one launch does both."""
        query, key, value, query_key = projections
        if query_key is not None and self.paired_qk:
            q, k = normed_rotated_pair(attn, *query_key, rope, token_major=self.token_major)
        else:
            q = normed_rotated(attn, *query, "q", rope, token_major=self.token_major)
            k = normed_rotated(attn, *key, "k", rope, token_major=self.token_major)
        return q, k, joined(*value).unflatten(-1, (-1, attn.head_dim))

    def _local_attention(self) -> Any:
        """The attention over every token of this rank's heads: all of them on one GPU, a Ulysses rank's
        once its exchange has brought every token."""
        backend, fa4, sms = self._attention_backend, self.fa4, self.fa4_wave_sms

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if not (fa4 and takes(q)):
                return dispatch_attention_fn(q, k, v, backend=backend)
            plan = planned(q, k, sms)
            if plan is None:
                return fa4_attention(q, k, v)
            return fa4_attention_waves(q, k, v, plan.main_rows, plan.splits)

        return attend


def use_fa4_attention(transformer: Any, wave_sms: int = 0) -> int:
    """Have every fused processor attend through FlashAttention-4, its calls split by
    ``worker.optimizations.fa4_waves`` on a GPU of ``wave_sms`` SMs (0: unsplit); returns how many. The
    caller checks that it can run (``fa4_unavailable``) and that no other backend was asked for."""
    changed = 0
    for module in transformer.modules():
        processor: Any = getattr(module, "processor", None)
        if isinstance(processor, FusedQKFluxAttnProcessor):
            processor.fa4 = True
            processor.fa4_wave_sms = wave_sms
            changed += 1
    return changed


def weighted_norms_with_one_eps(attn: Any) -> bool:
    """The kernel takes one epsilon and a weight for each of the attention's query/key norms."""
    names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    norms = [getattr(attn, name) for name in names if getattr(attn, name, None) is not None]
    eps = attn.norm_q.eps
    weighted = all(getattr(norm, "weight", None) is not None for norm in norms)
    return weighted and eps is not None and all(norm.eps == eps for norm in norms)


def apply_fused_qk_norm_rope(
    transformer: Any, processor_class: type[FusedQKFluxAttnProcessor] = FusedQKFluxAttnProcessor
) -> int:
    """Give every FLUX.1 attention the fused processor (or a subclass); returns how many changed.

    Call it before a sequence-parallel layout is applied: processors that already carry a parallel config,
    or of another class (IP-Adapter's), keep theirs, as do norms without weights or with different epsilons.
    """
    changed = 0
    for module in transformer.modules():
        processor: Any = getattr(module, "processor", None)
        if type(processor) not in (FluxAttnProcessor, FusedQKFluxAttnProcessor):
            continue
        if processor._parallel_config is not None or not weighted_norms_with_one_eps(module):
            continue
        fused = processor_class()
        fused._attention_backend = processor._attention_backend
        module.processor = fused
        changed += 1
    return changed
