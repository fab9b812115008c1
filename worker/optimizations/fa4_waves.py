"""FA4's attention without its last, partly idle wave (``--no-fa4-waves`` turns it off).

FA4's Hopper forward (``worker.optimizations.fa4_attention``) gives each (query tile of 128 rows, head) its
own CTA, one CTA an SM at head dim 128. FLUX.1 at 1024 x 1024 on one GPU attends 4,608 tokens over 24 heads:
36 x 24 = 864 tiles on an H100's 132 SMs, 6.55 waves that take 7, the last with 72 of 132 SMs at work.
A Ulysses-2 rank's 12 heads fill 3.27 waves of 4.

``wave_plan`` finds a split that leaves less idle: the first ``main_rows`` queries (whole waves of tiles: 33
tiles of rows, 792 = 6 x 132) in one call, and the rest (3 tiles of rows) against each of ``splits`` parts of
the keys (1,536 each), every part a batch of one call of its own (216 short tiles, in under 2 waves of a
third). The parts' outputs are combined by their log-sum-exps (``combine``), as FlashAttention's own split-KV
does, and written beside the first call's, which FA4 writes into the same output buffer. By the tile count
the attention takes ~6.7 waves' time for 7; the tail's call and the combine cost a few microseconds more.
Measured alone on an H100 (lease 121, ``bench.fa4_check --waves``): 1% off one GPU's call (the tail's
third-length tiles still load their query and store their output), 9% off a Ulysses-2 rank's; in the lossless
image, with ``--image-rows-last``, 1.2-1.7% (leases 122, 124 and 125; docs/performance.md).

``fluxgate::fa4_attention_waves`` is the op, opaque to the compiler like ``fluxgate::fa4_attention``. On
CUDA the attention is FA4's (the tail's query read through a batch stride of 0, not copied, where FA4
takes it) and the combine a Triton kernel; elsewhere both are torch's math (the CPU tests hold the split
to the unsplit attention). The same numbers come out but for rounding: each part's output is rounded to the
query's dtype before the combine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the combine runs torch's math
    triton = None

TILE_ROWS = 128  # FA4's Hopper query tile at head dims 65-256 (flash_attn.cute.interface._tile_size_fwd_sm90)
MAX_SPLITS = 4
# in a whole tile's time: a tile's fixed cost (its query loaded, its output and log-sum-exp stored: a third of
# the keys took 0.40 of a whole tile's time on an H100, lease 121), and the tail's launch with the combine's
# (2.8 us of a ~61 us wave); a split is taken where it saves this much of the unsplit waves at least
TILE_OVERHEAD = 0.07
CALL_OVERHEAD = 0.06
MIN_SAVING = 0.01

# FA4 reads the tail's query once for every part, through a batch stride of 0; cleared by ``trial_call``
# where an install refuses that, and the query is then copied once for each part
QUERY_BROADCAST = True


@dataclass(frozen=True)
class WavePlan:
    main_rows: int  # queries attended in one call: whole waves of tiles
    splits: int  # the rest attend each of this many parts of the keys, combined


def waves(tiles: int, sms: int) -> int:
    return -(-tiles // sms)


def wave_plan(batch: int, heads: int, tokens: int, keys: int, sms: int) -> WavePlan | None:
    """The split of one attention call that leaves the fewest SMs idle, by the tile count; ``None`` where
    none saves ``MIN_SAVING`` of the unsplit call's waves. Batches of one only (the parts are a batch)."""
    rows = -(-tokens // TILE_ROWS)
    if batch != 1 or sms <= 0 or rows < 2:
        return None
    unsplit = waves(heads * rows, sms)
    best, best_cost = None, unsplit * (1 - MIN_SAVING)
    for main in range(1, rows):
        for splits in range(2, MAX_SPLITS + 1):
            if keys % splits:
                continue
            tail = waves(heads * (rows - main) * splits, sms) * (1 / splits + TILE_OVERHEAD)
            cost = waves(heads * main, sms) + tail + CALL_OVERHEAD
            if cost < best_cost:
                best, best_cost = WavePlan(main * TILE_ROWS, splits), cost
    return best


def planned(query: torch.Tensor, key: torch.Tensor, sms: int) -> WavePlan | None:
    """``wave_plan`` for a token-major (batch, tokens, heads, head_dim) query and its key on ``sms`` SMs:
    ``None`` for shapes the compiler keeps symbolic (a plan is per shape) and head dims the combine does not
    take (powers of two). FLUX's head dim is 128; at 64 and under FA4's tiles are 192 rows, so a plan counted
    in ``TILE_ROWS`` is off there (the split still gives the same output)."""
    batch, tokens, heads, head_dim = query.shape
    keys = key.shape[1]
    if not all(isinstance(size, int) for size in (batch, tokens, heads, head_dim, keys)):
        return None
    if head_dim & (head_dim - 1):
        return None
    return wave_plan(batch, heads, tokens, keys, sms)


def sm_count(device: torch.device) -> int:
    """The SMs FA4's tiles spread over (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


# attend(query, key, value, out) -> (out, log-sum-exp (batch, heads, tokens) in fp32, or None where not asked)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool], tuple]


def reference_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor | None, lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention in fp32, token-major: FA4's contract (its output in the query's dtype)."""
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(query.shape[-1])
    log_sum_exp = scores.logsumexp(-1)
    result = ((scores - log_sum_exp[..., None]).exp() @ v).transpose(1, 2).to(query.dtype)
    if out is None:
        out = result.contiguous()
    else:
        out.copy_(result)
    return out, log_sum_exp if lse else None


def fa4_attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor | None, lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from flash_attn.cute.interface import _flash_attn_fwd

    result = _flash_attn_fwd(query, key, value, out=out, return_lse=lse)
    return result[0], result[1] if lse else None


def split_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, main_rows: int, splits: int, attend: Attend
) -> torch.Tensor:
    """``attend`` over the first ``main_rows`` queries, written into the output; the rest against ``splits``
    equal parts of the keys, combined into the output's last rows. Batches of one."""
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    attend(query[:, :main_rows], key, value, out[:, :main_rows], False)
    partial, log_sum_exp = attend(*tail_parts(query, key, value, main_rows, splits), None, True)
    combine(partial, log_sum_exp, out[0, main_rows:])
    return out


def tail_parts(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, main_rows: int, splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tail's call as a batch of ``splits``: the queries after ``main_rows`` once for each part (through a
    batch stride of 0 where ``QUERY_BROADCAST``, copied otherwise), and the key and value as views of their
    ``splits`` equal parts."""
    tail = query[:, main_rows:]
    tail = tail.expand(splits, *tail.shape[1:]) if QUERY_BROADCAST else tail.repeat(splits, 1, 1, 1)
    keys = key.shape[1] // splits
    key_parts, value_parts = (x[0].unflatten(0, (splits, keys)) for x in (key, value))
    return tail, key_parts, value_parts


def combine(partial: torch.Tensor, log_sum_exp: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (tokens, heads, head_dim) = the parts' outputs (parts, tokens, heads, head_dim) weighted by
    their share of the softmax's denominator, from their log-sum-exps (parts, heads, tokens)."""
    if out.is_cuda and triton is not None:
        _triton_combine(partial, log_sum_exp, out)
        return
    weights = torch.softmax(log_sum_exp, dim=0).transpose(1, 2).unsqueeze(-1)
    out.copy_((weights * partial.float()).sum(0))


@torch.library.custom_op("fluxgate::fa4_attention_waves", mutates_args=())
def fa4_attention_waves(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, main_rows: int, splits: int
) -> torch.Tensor:
    """``fluxgate::fa4_attention``'s attention, split by a ``WavePlan``: (1, tokens, heads, head_dim) in and
    out, the key's tokens a multiple of ``splits``."""
    attend = fa4_attend if query.device.type == "cuda" else reference_attend
    return split_attention(query, key, value, main_rows, splits, attend)


@fa4_attention_waves.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, main_rows: int, splits: int
) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def trial_call(device: torch.device) -> None:
    """A small split attention through the op at load: compiles FA4's kernel that also writes the log-sum-exp
    and the combine, and finds whether FA4 reads a query through a batch stride of 0."""
    global QUERY_BROADCAST
    trial = torch.zeros(1, 2 * TILE_ROWS, 1, 128, device=device, dtype=torch.bfloat16)
    try:
        fa4_attention_waves(trial, trial, trial, TILE_ROWS, 2)
    except Exception:
        QUERY_BROADCAST = False
        fa4_attention_waves(trial, trial, trial, TILE_ROWS, 2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if triton is not None:

    @triton.jit
    def _combine_kernel(
        partial,
        lse,
        out,
        heads,
        partial_split_stride,
        partial_token_stride,
        partial_head_stride,
        lse_split_stride,
        lse_head_stride,
        out_token_stride,
        out_head_stride,
        SPLITS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        live = head < heads
        dim = tl.arange(0, HEAD_DIM)
        lse_rows = lse + head * lse_head_stride + token
        top = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)
        for split in tl.static_range(SPLITS):
            part = tl.load(lse_rows + split * lse_split_stride, mask=live, other=0.0)
            top = tl.maximum(top, part)
        total = tl.zeros([BLOCK_HEADS], tl.float32)
        acc = tl.zeros([BLOCK_HEADS, HEAD_DIM], tl.float32)
        for split in tl.static_range(SPLITS):
            part = tl.load(lse_rows + split * lse_split_stride, mask=live, other=0.0)
            weight = tl.exp(part - top)
            total += weight
            rows = partial + split * partial_split_stride + token * partial_token_stride
            values = tl.load(rows + head[:, None] * partial_head_stride + dim[None, :], mask=live[:, None])
            acc += weight[:, None] * values.to(tl.float32)
        acc = acc / total[:, None]
        target = out + token * out_token_stride + head[:, None] * out_head_stride + dim[None, :]
        tl.store(target, acc.to(out.dtype.element_ty), mask=live[:, None])

    def _triton_combine(partial: torch.Tensor, log_sum_exp: torch.Tensor, out: torch.Tensor) -> None:
        splits, tokens, heads, head_dim = partial.shape
        block_heads = 8
        _combine_kernel[(tokens, triton.cdiv(heads, block_heads))](
            partial,
            log_sum_exp,
            out,
            heads,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            log_sum_exp.stride(0),
            log_sum_exp.stride(1),
            out.stride(0),
            out.stride(1),
            SPLITS=splits,
            HEAD_DIM=head_dim,
            BLOCK_HEADS=block_heads,
        )
