"""Ulysses with the query, key and value in one all-to-all (``packed_ulysses_attention``).

diffusers' Ulysses (``TemplatedUlyssesAttention``, models/attention_dispatch.py) sends the query, the key
and the value in three all-to-alls, then the attention's output back in a fourth. On 2xH100 one exchange
of a 1024x1024 image's half sequence (14.2 MB, 24 heads x 128) takes 60-63 us, and three tensors in one call
112 us, 37 us a tensor (``bench.exchange``, lease 67, docs/performance.md): NCCL moves small messages below
its link rate, and no NCCL setting tried changed that. Packing the three tensors into one exchange cost
three copies out of the received buffer that diffusers' layout did not need. Measured on 2xH200 (lease
68): the exchanges' kernel time 0.231 s an image against 0.305, the copies 0.029 s more, the image 2.232 s
against 2.255 s.

The exchanges are diffusers' own (functional collectives, waited for at once, so the compiled block stays
one graph), and the attention runs on the same tokens in the same order: the output is the unpacked path's.
Ulysses alone (no Ring), without a mask; anything else keeps diffusers' dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from worker.optimizations.symmetric_exchange import (
    exchange_back,
    exchange_back_beside,
    exchange_in,
    exchange_in_beside,
)


def packed_exchange_applies(parallel_config: Any, attention_mask: torch.Tensor | None) -> bool:
    """A Ulysses-only layout and no mask: the packed exchange stands in for diffusers' here."""
    layout = getattr(parallel_config, "context_parallel_config", None)
    if layout is None or attention_mask is not None:
        return False
    return (layout.ulysses_degree or 1) > 1 and (layout.ring_degree or 1) == 1


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ulysses_group(parallel_config: Any) -> tuple[Any, int]:
    """The Ulysses process group of diffusers' parallel config, and its degree."""
    layout = parallel_config.context_parallel_config
    return layout._ulysses_mesh.get_group(), layout.ulysses_degree


def exchange(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-to-all of ``tensor``'s first dimension over ``group`` (chunk ``i`` to rank ``i``), waited for."""
    received = funcol.all_to_all_single(tensor.flatten(), None, None, group)
    return funcol.wait_tensor(received).view(tensor.shape)


def packed_ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    parallel_config: Any,
    attend: Attend,
    symmetric: bool = False,
) -> torch.Tensor:
    """Attention over the whole sequence from this rank's shard: (batch, tokens, heads, head_dim) in, the
    same out. Each rank sends every other rank that rank's heads of its tokens (query, key and value in one
    exchange), ``attend``s its heads over every rank's tokens, and sends each rank its tokens back.

    ``symmetric``: the same bytes through symmetric memory, copied by the copy engines
    (``worker.optimizations.symmetric_exchange``; CUDA only), not NCCL's all-to-all."""
    group, world = ulysses_group(parallel_config)
    if symmetric:
        received = exchange_in(query, key, value, group.group_name, world)
        return exchange_back(attend(received[0], received[1], received[2]), group.group_name, world)
    batch, tokens, heads, head_dim = query.shape
    local = heads // world
    # (rank, q/k/v, batch, tokens, heads of that rank, head_dim): chunk r holds rank r's heads
    packed = torch.stack((query, key, value)).view(3, batch, tokens, world, local, head_dim)
    received = exchange(packed.permute(3, 0, 1, 2, 4, 5).contiguous(), group)
    # received[r]: rank r's tokens of this rank's heads; the whole sequence is the ranks' tokens in order
    whole = [
        received[:, part].transpose(0, 1).reshape(batch, world * tokens, local, head_dim) for part in range(3)
    ]
    out = attend(*whole)
    # back: chunk r of the sequence to rank r, which gets (rank, batch, its tokens, that rank's heads)
    returned = exchange(
        out.reshape(batch, world, tokens, local, head_dim).transpose(0, 1).contiguous(), group
    )
    return returned.permute(1, 2, 0, 3, 4).reshape(batch, tokens, heads, head_dim)


@dataclass
class PendingAttention:
    """A Ulysses attention whose exchanges run beside a single block's GEMMs, given by the block:
    ``attend_beside`` (the way in beside the MLP's input projection) and ``settle_beside`` (the way back
    beside ``proj_out``'s MLP part). Through symmetric memory each pair is one op (the exchange on a side
    stream, copy engines, while the GEMM runs); otherwise (NCCL, the CPU) one after the other."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    parallel_config: Any
    attend: Attend
    symmetric: bool
    out: torch.Tensor | None = None

    def _group(self) -> tuple[str, int]:
        group, world = ulysses_group(self.parallel_config)
        return group.group_name, world

    def attend_beside(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The attention, this rank's heads over every token; returns ``gelu(hidden @ weight^T + bias)``
        (tanh; ``hidden`` 2-D), computed beside the way in."""
        if not self.symmetric:
            projected = F.gelu(F.linear(hidden, weight, bias), approximate="tanh")
            self.out = packed_ulysses_attention(
                self.query, self.key, self.value, self.parallel_config, self.attend
            )
            return projected
        name, world = self._group()
        received, projected = exchange_in_beside(
            self.query, self.key, self.value, hidden, weight, bias, name, world
        )
        self.out = self.attend(received[0], received[1], received[2])
        return projected

    def settle_beside(self, mat1: torch.Tensor, mat2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mat1 @ mat2``, computed beside the way back, and the attention's output for this rank's tokens
        (batch, tokens, heads, head_dim)."""
        assert self.out is not None, "attend_beside first"
        if not self.symmetric:
            return torch.mm(mat1, mat2), self.out
        name, world = self._group()
        result, product = exchange_back_beside(self.out, mat1, mat2, name, world)
        return product, result.flatten(2, 3)
