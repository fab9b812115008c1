"""Ulysses' two exchanges through symmetric memory: the peers' parts copied over NVLink by the copy engines.

A Ulysses-2 image on two GPUs spends ~0.23 s in NCCL's all-to-alls (lease 68, 2xH200: 3,192 exchanges,
query, key and value packed into one). Timed alone (``bench.exchange``, lease 67, 2xH100), an all-to-all
costs ~38 us a call whatever it sends, plus 3.5 us a MB, and its kernels take SMs from the GEMMs beside it.
Symmetric memory (``torch.distributed._symmetric_memory``) maps each rank's workspace into its peers'
address space, so an exchange needs no communicator at all: each part crosses NVLink as one contiguous
``cudaMemcpyAsync``, which the copy engines carry without SMs, and the ranks meet at one barrier (a small
kernel that signals each peer and waits for their signals).

Per exchange (every rank runs the same exchanges in the same order: the group's ranks are in lockstep):

* in (query, key, value: this rank's tokens, every head -> every rank's tokens, this rank's heads): each
  rank writes each peer's heads of its tokens into its workspace's region *in* (a slot per peer) and its
  own heads into place (one Triton kernel), meets its peers at the barrier, then pulls its slot out of
  each peer's region *in* (``received``: the three inputs of the attention, whole, as one tensor);
* back (the attention's output: every rank's tokens, this rank's heads -> this rank's tokens, every head):
  each rank pushes each peer's tokens into that peer's region *back* (a slot per sender), meets its peers
  at the barrier, then places its own tokens and what its peers pushed side by side (one Triton kernel).

``exchange_in`` and ``exchange_back`` run it on the caller's stream. ``exchange_in_beside`` and
``exchange_back_beside`` run the barrier and the copies on a side stream while a GEMM the caller gives
runs on its own, and join the two before returning (a single block's MLP GEMMs:
``worker.optimizations.ulysses.PendingAttention``). Either way each op's work is ordered after the
previous op's on every stream, so the argument below holds for any mix of them.

Why one barrier an exchange is enough: the two kinds alternate (each attention has one of each), so
between two exchanges that use a region there is always the other kind's barrier, and no rank arrives at
it before it has finished with that region:
* region *in*: a peer pulls my exchange ``i`` after barrier ``i`` and before it arrives at ``i + 1``; I
  write the region again at ``i + 2``, after barrier ``i + 1``.
* region *back*: I read what a peer pushed at ``i`` after barrier ``i`` and before I arrive at ``i + 1``;
  the peer pushes again at ``i + 2``, after barrier ``i + 1``.

The workspace is allocated and rendezvoused (a collective: all ranks at the same call, in lockstep) at the
first exchange that needs more room than it has: in a warm-up run, never inside a CUDA graph's capture
(``worker.optimizations.cuda_graphs`` warms each signature up before capturing it). The barrier's kernel
and the copies are captured with the step and replayed with it. A peer that never arrives makes the
barrier's kernel trap after ``BARRIER_TIMEOUT_MS``: the rank's CUDA context fails, its process exits, and
the group goes down as it does for a dead rank (docs/reliability.md), never hanging.

The bytes moved are the NCCL exchange's, in the same places (``received`` is the packed exchange's
``whole``): the attention sees the same inputs and the image is the same. Measured on 2xH200: the round
trip 138 us against NCCL's 300 us (lease 74); a Ulysses-2 image 2.073 s against 2.181 s (lease 74), and
2.053 s against 2.099 s with the single blocks' exchanges beside their GEMMs (lease 75).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

try:  # shipped with CUDA builds of torch; absent from CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BARRIER_TIMEOUT_MS = 300_000  # the group's collective timeout (--group-timeout-s: set_barrier_timeout)
HAS_SYMMETRIC_MEMORY = importlib.util.find_spec("torch.distributed._symmetric_memory") is not None


def set_barrier_timeout(seconds: float) -> None:
    """How long a barrier waits for a peer before it traps: the group's collective timeout."""
    global BARRIER_TIMEOUT_MS
    BARRIER_TIMEOUT_MS = max(1, int(seconds * 1000))


class Symmetric(Protocol):
    """What an exchange uses of a rendezvoused workspace (torch's ``_SymmetricMemory`` handle)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def get_buffer(
        self, rank: int, sizes: Sequence[int], dtype: torch.dtype, storage_offset: int = 0
    ) -> torch.Tensor: ...

    def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None: ...


@dataclass(frozen=True)
class Layout:
    """One exchange's shapes: a rank's ``tokens`` of ``heads``, over ``world`` ranks."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    world: int

    @staticmethod
    def of(shard: torch.Tensor, world: int) -> Layout:
        batch, tokens, heads, head_dim = shard.shape
        if heads % world:
            raise ValueError(f"{heads} heads do not split over {world} ranks")
        return Layout(batch, tokens, heads, head_dim, world)

    @staticmethod
    def of_whole(whole: torch.Tensor, world: int) -> Layout:
        """From a tensor of every rank's tokens of this rank's heads: (batch, world x tokens, local heads,
        head_dim), the attention's output (``received``'s parts have the same shape)."""
        batch, sequence, local, head_dim = whole.shape[-4:]
        return Layout(batch, sequence // world, local * world, head_dim, world)

    @property
    def local(self) -> int:
        return self.heads // self.world

    @property
    def received(self) -> tuple[int, ...]:
        """The attention's inputs, whole: (query/key/value, batch, world x tokens, local heads, head_dim)."""
        return (3, self.batch, self.world * self.tokens, self.local, self.head_dim)

    @property
    def result(self) -> tuple[int, ...]:
        """The way back's result: (batch, tokens, world, local heads, head_dim)."""
        return (self.batch, self.tokens, self.world, self.local, self.head_dim)

    @property
    def slot(self) -> tuple[int, int, int, int]:
        """One peer's part of one tensor: (batch, tokens, local heads, head_dim)."""
        return (self.batch, self.tokens, self.local, self.head_dim)

    @property
    def slot_numel(self) -> int:
        return self.batch * self.tokens * self.local * self.head_dim

    @property
    def inward(self) -> tuple[int, ...]:
        """Region *in*: (destination rank, query/key/value, slot)."""
        return (self.world, 3, *self.slot)

    @property
    def back(self) -> tuple[int, ...]:
        """Region *back*: (sending rank, slot)."""
        return (self.world, *self.slot)

    @property
    def back_offset(self) -> int:
        """Region *back* starts where region *in* ends (elements of the exchange's dtype)."""
        return 3 * self.world * self.slot_numel

    def workspace_bytes(self, dtype: torch.dtype) -> int:
        return 4 * self.world * self.slot_numel * dtype.itemsize


def _tokens(rank: int, layout: Layout) -> slice:
    return slice(rank * layout.tokens, (rank + 1) * layout.tokens)


def send_in(memory: Symmetric, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Before the barrier: each peer's heads into this rank's region *in*, this rank's own into
    ``received`` (3, batch, world x tokens, local heads, head_dim), which is returned."""
    layout, me = Layout.of(query, memory.world_size), memory.rank
    region = memory.get_buffer(me, layout.inward, query.dtype, 0)
    received = query.new_empty(layout.received)
    if _rows_kernels_apply(query, key, value):
        _triton_pack_in(query, key, value, received, region, layout, me)
        return received
    for part, tensor in enumerate((query, key, value)):
        by_rank = tensor.reshape(*layout.slot[:2], layout.world, layout.local, layout.head_dim)
        for rank in range(layout.world):
            target = received[part, :, _tokens(me, layout)] if rank == me else region[rank, part]
            target.copy_(by_rank[:, :, rank])
    return received


def pull_in(memory: Symmetric, received: torch.Tensor) -> torch.Tensor:
    """After the barrier: this rank's slot out of each peer's region *in*, one contiguous copy per part and
    batch row (the copy engines carry them)."""
    world, me = memory.world_size, memory.rank
    layout = Layout.of_whole(received, world)
    for rank in range(world):
        if rank == me:
            continue
        theirs = memory.get_buffer(rank, layout.inward, received.dtype, 0)[me]
        for part in range(3):
            for row in range(layout.batch):
                received[part, row, _tokens(rank, layout)].copy_(theirs[part, row])
    return received


def send_back(memory: Symmetric, out: torch.Tensor) -> None:
    """Before the barrier: each peer's tokens of ``out`` (batch, world x tokens, local heads, head_dim)
    pushed into that peer's region *back*, one contiguous copy per batch row (the copy engines)."""
    world, me = memory.world_size, memory.rank
    layout = Layout.of_whole(out, world)
    for rank in range(world):
        if rank == me:
            continue
        theirs = memory.get_buffer(rank, layout.back, out.dtype, layout.back_offset)[me]
        for row in range(layout.batch):
            theirs[row].copy_(out[row, _tokens(rank, layout)])


def place_back(memory: Symmetric, out: torch.Tensor, result: torch.Tensor | None = None) -> torch.Tensor:
    """After the barrier: this rank's tokens of ``out`` and what each peer pushed into this rank's region
    *back*, side by side in ``result`` (batch, tokens, world, local heads, head_dim; allocated if not
    given), returned as (batch, tokens, heads, head_dim)."""
    world, me = memory.world_size, memory.rank
    layout = Layout.of_whole(out, world)
    region = memory.get_buffer(me, layout.back, out.dtype, layout.back_offset)
    if result is None:
        result = out.new_empty(layout.result)
    if _rows_kernels_apply(out):
        _triton_place_back(out, region, result, layout, me)
        return result.flatten(2, 3)
    for rank in range(world):
        result[:, :, rank].copy_(out[:, _tokens(me, layout)] if rank == me else region[rank])
    return result.flatten(2, 3)


def _rows_kernels_apply(*tensors: torch.Tensor) -> bool:
    """CUDA tensors whose (local heads x head_dim) rows are contiguous: Triton's row copies, else torch's."""
    return triton is not None and all(
        t.is_cuda and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in tensors
    )


def power_of_two_divisor(value: int, cap: int) -> int:
    """The largest power of two up to ``cap`` (itself one) that divides ``value``."""
    divisor = cap
    while value % divisor:
        divisor //= 2
    return divisor


def _block(row: int) -> int:
    """Elements a row copy moves at a time: up to 1,024 (16-byte loads from 8)."""
    return power_of_two_divisor(row, 1024)


def _triton_pack_in(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    received: torch.Tensor,
    region: torch.Tensor,
    layout: Layout,
    me: int,
) -> None:
    row = layout.local * layout.head_dim
    strides = [(t.stride(0), t.stride(1)) for t in (query, key, value)]
    if len(set(strides)) != 1:  # one kernel reads all three with one set of strides
        query, key, value = (t.contiguous() for t in (query, key, value))
    grid = (layout.batch * layout.tokens, 3, layout.world)
    _pack_in_kernel[grid](
        query, key, value, received, region, query.stride(0), query.stride(1),
        layout.tokens, layout.batch, layout.world, me, ROW=row, BLOCK=_block(row),
    )  # fmt: skip


def _triton_place_back(
    out: torch.Tensor, region: torch.Tensor, result: torch.Tensor, layout: Layout, me: int
) -> None:
    row = layout.local * layout.head_dim
    grid = (layout.batch * layout.tokens, layout.world)
    _place_back_kernel[grid](
        out, region, result, out.stride(0), out.stride(1), layout.tokens, layout.batch, layout.world, me,
        ROW=row, BLOCK=_block(row),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _copy_row(src, dst, ROW: tl.constexpr, BLOCK: tl.constexpr):
        for start in tl.static_range(0, ROW, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            tl.store(dst + offsets, tl.load(src + offsets))

    @triton.jit
    def _pack_in_kernel(
        query_ptr,
        key_ptr,
        value_ptr,
        received_ptr,
        region_ptr,
        batch_stride,
        token_stride,
        tokens,
        batch,
        world,
        me,
        ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program (token row, part, rank): that rank's heads of one token of the query, key or value,
        to ``received`` (this rank's) or to the region's slot for that rank."""
        index = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        rank = tl.program_id(2)
        b = index // tokens
        t = index % tokens
        source_offset = b * batch_stride + t * token_stride + rank * ROW
        if part == 0:
            source = query_ptr + source_offset
        elif part == 1:
            source = key_ptr + source_offset
        else:
            source = value_ptr + source_offset
        if rank == me:
            target = received_ptr + ((part * batch + b) * world * tokens + me * tokens + t) * ROW
        else:
            target = region_ptr + (((rank * 3 + part) * batch + b) * tokens + t) * ROW
        _copy_row(source, target, ROW, BLOCK)

    @triton.jit
    def _place_back_kernel(
        out_ptr,
        region_ptr,
        result_ptr,
        batch_stride,
        token_stride,
        tokens,
        batch,
        world,
        me,
        ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program (token row, rank): that rank's heads of one of this rank's tokens, from ``out`` (this
        rank's own) or from the region's slot the rank pushed into."""
        index = tl.program_id(0).to(tl.int64)
        rank = tl.program_id(1)
        b = index // tokens
        t = index % tokens
        if rank == me:
            source = out_ptr + b * batch_stride + (me * tokens + t) * token_stride
        else:
            source = region_ptr + ((rank * batch + b) * tokens + t) * ROW
        _copy_row(source, result_ptr + (index * world + rank) * ROW, ROW, BLOCK)


@dataclass
class Workspace:
    """A group's symmetric buffer on one device, and the handle its exchanges use."""

    buffer: torch.Tensor
    memory: Symmetric


_workspaces: dict[tuple[str, int | None], Workspace] = {}
# Workspaces outgrown by a larger exchange: kept, never freed, as peers map them (growth is rare: each
# new largest shape once)
_retired: list[Workspace] = []


def workspace(group_name: str, device: torch.device, nbytes: int) -> Symmetric:
    """The group's workspace on ``device``, with room for ``nbytes`` (allocated and rendezvoused, a
    collective, when it has less)."""
    key = (group_name, device.index)
    held = _workspaces.get(key)
    if held is not None and held.buffer.numel() >= nbytes:
        return held.memory
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the symmetric exchange needs a {nbytes}-byte workspace during a CUDA graph's capture: it is "
            "allocated in the warm-up run before it"
        )
    import torch.distributed._symmetric_memory as symm_mem

    _enable_for_group(symm_mem, group_name)
    if held is not None:
        torch.cuda.synchronize(device)
        _retired.append(held)
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    name: Any = group_name  # a str at runtime: torch 2.13 types it as its GroupName
    _workspaces[key] = Workspace(buffer, cast(Symmetric, symm_mem.rendezvous(buffer, name)))
    return _workspaces[key].memory


def _enable_for_group(symm_mem: Any, group_name: str) -> None:
    """torch releases before 2.13 want the group registered first; later ones warn that it is not needed."""
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is None or symm_mem.is_symm_mem_enabled_for_group(group_name):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(group_name)


@torch.library.custom_op("fluxgate::symmetric_exchange_in", mutates_args=())
def exchange_in(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_name: str, world: int
) -> torch.Tensor:
    """The attention's inputs, whole: (3, batch, world x tokens, heads / world, head_dim)."""
    layout = Layout.of(query, world)
    memory = workspace(group_name, query.device, layout.workspace_bytes(query.dtype))
    received = send_in(memory, query, key, value)
    memory.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
    return pull_in(memory, received)


@exchange_in.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_name: str, world: int
) -> torch.Tensor:
    return query.new_empty(Layout.of(query, world).received)


@torch.library.custom_op("fluxgate::symmetric_exchange_back", mutates_args=())
def exchange_back(out: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """The attention's output for this rank's tokens: (batch, tokens, heads, head_dim)."""
    layout = Layout.of_whole(out, world)
    memory = workspace(group_name, out.device, layout.workspace_bytes(out.dtype))
    send_back(memory, out)
    memory.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
    return place_back(memory, out)


@exchange_back.register_fake
def _(out: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    return out.new_empty(Layout.of_whole(out, world).result).flatten(2, 3)


_side_streams: dict[int | None, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a started exchange runs on (high priority: its barrier and placing kernel take the
    first SMs a GEMM beside them frees)."""
    if device.index not in _side_streams:
        _side_streams[device.index] = torch.cuda.Stream(device, priority=-1)
    return _side_streams[device.index]


@torch.library.custom_op("fluxgate::symmetric_exchange_in_beside", mutates_args=())
def exchange_in_beside(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    group_name: str,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``exchange_in`` with ``gelu(hidden @ weight^T + bias)`` (tanh; cuBLASLt's epilogue) computed while
    it runs: packed here, then the barrier and the pulls on the side stream beside the GEMM, joined before
    returning (received, the GEMM's output). One op, so the compiled graph cannot move the GEMM away."""
    layout = Layout.of(query, world)
    memory = workspace(group_name, query.device, layout.workspace_bytes(query.dtype))
    received = send_in(memory, query, key, value)
    main, side = torch.cuda.current_stream(query.device), side_stream(query.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        memory.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
        pull_in(memory, received)
    projected = torch._addmm_activation(bias, hidden, weight.t(), use_gelu=True)
    main.wait_stream(side)
    return received, projected


@exchange_in_beside.register_fake
def _(query: torch.Tensor, *others: Any) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, weight, world = others[2], others[3], others[-1]
    received = query.new_empty(Layout.of(query, world).received)
    return received, hidden.new_empty(hidden.shape[0], weight.shape[0])


@torch.library.custom_op("fluxgate::symmetric_exchange_back_beside", mutates_args=())
def exchange_back_beside(
    out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, group_name: str, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``exchange_back`` with ``mat1 @ mat2`` computed while it runs: the push, the barrier and the placing
    on the side stream beside the GEMM, joined before returning (the result as (batch, tokens, world,
    local heads, head_dim), the GEMM's output)."""
    layout = Layout.of_whole(out, world)
    memory = workspace(group_name, out.device, layout.workspace_bytes(out.dtype))
    result = out.new_empty(layout.result)
    main, side = torch.cuda.current_stream(out.device), side_stream(out.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        send_back(memory, out)
        memory.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
        place_back(memory, out, result)
    product = torch.mm(mat1, mat2)
    main.wait_stream(side)
    return result, product


@exchange_back_beside.register_fake
def _(
    out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, group_name: str, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return out.new_empty(Layout.of_whole(out, world).result), mat1.new_empty(mat1.shape[0], mat2.shape[1])


def symmetric_exchange_applies(query: torch.Tensor) -> bool:
    """CUDA tensors, a torch with symmetric memory and GPUs that map each other's memory (NVLink or PCIe
    peer access); otherwise the NCCL exchange stays."""
    return query.is_cuda and HAS_SYMMETRIC_MEMORY and peers_reachable(query.device.index)


@torch.compiler.assume_constant_result
def peers_reachable(device: int | None) -> bool:
    """Whether ``device`` can access every other visible GPU's memory (a group's ranks are this host's GPUs);
    answered when the compiled block is traced, and once a device for eager calls."""
    return _peer_access(torch.cuda.current_device() if device is None else device)


@functools.cache
def _peer_access(here: int) -> bool:
    others = [index for index in range(torch.cuda.device_count()) if index != here]
    return all(torch.cuda.can_device_access_peer(here, other) for other in others)
