"""FLUX.1's adaLN modulation projected once per job for all its steps (``--precompute-modulation``).

Each FLUX.1 block projects the step's conditioning embedding (timestep, guidance, pooled prompt) into its
shifts, scales and gates: 77 linear layers applied to one row each (19 double blocks x 2, 38 single
blocks, the output norm). Their weights, 3.2B parameters or 6.5 GB in bf16, are read from memory at
every step to multiply a single row: ~2 ms of an H100's 90-130 ms step. The embedding depends only on
the step's timestep, the guidance and the pooled prompt, all fixed when the pipeline starts its loop, so
the engine projects every step at once, one GEMM per layer with a row per step (the weights read once a
job), into a table. Before each transformer call the step's row is copied into a static buffer, which
the layers return instead of projecting (compiled blocks and CUDA graphs read it at a fixed address).

The same math on the same values: only the GEMMs' shapes change (a row per step instead of one), so the
image matches the per-step projection within the kernels' rounding, as any change of kernel does.
Each call's timestep is compared on the device with the row it was given, and ``Schedule.verify``
fails the job if one differed: a pipeline calling the transformer out of its scheduler's order would
otherwise get another step's modulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from torch import nn

from worker.optimizations.epilogues import unhooked_linear


class ModulationRows:
    """The current call's modulation row, in one static buffer per batch size, dtype and device, so the
    compiled blocks and the CUDA graphs that read it always read the same addresses. Each layer reads its
    columns through a buffer of its own (a view), an input of the compiled blocks like its weights: a
    per-layer offset read in the forward would specialise the blocks' shared graph on each layer.
    ``active`` is off between calls (the layers then project as usual)."""

    def __init__(self, layers: list[TabledLinear]) -> None:
        self.layers = layers
        self.width = sum(layer.out_features for layer in layers)
        self.active = False
        self._static: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._viewed: torch.Tensor | None = None

    def set(self, row: torch.Tensor) -> None:
        key = (row.shape[0], row.dtype, row.device)
        static = self._static.get(key)
        if static is None:
            with torch.inference_mode(False):  # an ordinary tensor: usable in and out of inference mode
                static = torch.empty(row.shape, dtype=row.dtype, device=row.device)
            self._static[key] = static
        static.copy_(row)
        if static is not self._viewed:  # another batch size than the last call's
            for layer in self.layers:
                layer.row = static[:, layer.start : layer.start + layer.out_features]
            self._viewed = static
        self.active = True


class TabledLinear(nn.Linear):
    """A modulation linear that returns its columns of the current row while a schedule runs.

    Set as the layer's class (``apply_modulation_tables``), so its parameters keep their names.
    """

    rows: ModulationRows
    start: int
    row: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.rows.active:
            return super().forward(input)
        return self.row


# A table holds at most this many bytes: a job of many images and steps (a batch of 16 at 100 steps would
# take 3.4 GB) projects its steps in chunks, reading the weights once a chunk instead of once a job.
TABLE_BYTES = 256 * 2**20
# Replayed as CUDA graphs, a table's projection is padded to a multiple of this many steps (within its
# chunk): a graph is captured per shape, and each new step count's first job captured one, at the job's
# start (0.4 s before the first step of a Ulysses-4 group's first 28-step job after a 2-step warm-up,
# 1.0-2.5 s through symmetric memory; leases 81-82, docs/performance.md). Padded, the warm-up's graph
# serves every job of up to 32 steps (FLUX.1-dev's 28, schnell's 4); the weights are read once either way.
GRAPH_STEPS = 32


@dataclass
class ModulationTables:
    """A transformer's modulation layers and the buffer they read (``apply_modulation_tables``)."""

    transformer: Any  # FluxTransformer2DModel
    layers: list[TabledLinear]
    rows: ModulationRows
    table_bytes: int = TABLE_BYTES
    # ``project`` replayed as CUDA graphs (set by the engine under --compile): launched from Python, its
    # 154 kernels left the GPU waiting 2.7-18 ms at each job's first step (lease 61's profiles)
    graphs: Callable[[torch.Tensor], torch.Tensor] | None = None

    def schedule(self, inner: Any, scheduler: Any) -> Schedule:
        """``inner`` (the transformer or its CUDA graphs) for one pipeline call, whose steps are the
        ``scheduler``'s timesteps (set by the pipeline before its loop calls the transformer)."""
        return Schedule(inner, self, scheduler)

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """Every layer's ``linear(silu(embedding))`` side by side: one GEMM per layer for all rows."""
        if self.graphs is not None:
            return self.graphs(embedding)
        return self.project_eagerly(embedding)

    def project_steps(self, embedding: torch.Tensor, steps: int, chunk: int) -> torch.Tensor:
        """``project`` of ``steps`` steps' rows (``embedding``: steps x batch rows, step-major). Replayed as
        graphs, the rows are padded with zeros to a multiple of ``GRAPH_STEPS`` steps, at most ``chunk``,
        and the padding's rows dropped from the table."""
        padded = min(chunk, -(-steps // GRAPH_STEPS) * GRAPH_STEPS)
        if self.graphs is None or padded <= steps:
            return self.project(embedding)
        rows = embedding.shape[0]
        extra = embedding.new_zeros(rows // steps * (padded - steps), embedding.shape[1])
        return self.project(torch.cat([embedding, extra]))[:rows]

    def project_eagerly(self, embedding: torch.Tensor) -> torch.Tensor:
        """``project`` launched from Python."""
        activated = F.silu(embedding)
        table = torch.empty(
            embedding.shape[0], self.rows.width, dtype=embedding.dtype, device=embedding.device
        )
        for layer in self.layers:
            table[:, layer.start : layer.start + layer.out_features] = F.linear(
                activated, layer.weight, layer.bias
            )
        return table


@dataclass
class Conditioning:
    """What a call's embedding depends on besides its timestep: the same tensors at every step."""

    dtype: torch.dtype  # the transformer's activations'
    timestep: torch.Tensor  # the first call's, for its dtype, device and batch size
    guidance: torch.Tensor | None
    pooled: torch.Tensor


@dataclass
class StepTable:
    """One conditioning's rows for a chunk of steps, and the timesteps each step's call must pass."""

    conditioning: Conditioning
    steps: int  # the scheduler's, all chunks together
    chunk: int  # steps a table holds
    first: int = 0  # the step of the table's first row
    timesteps: torch.Tensor | None = None  # (chunk, batch): as the pipeline passes them
    rows: torch.Tensor | None = None  # (chunk, batch, width)
    calls: int = 0


@dataclass
class Schedule:
    """Stands in for the transformer during one pipeline call: each call gets its step's row.

    Tables are keyed by the conditioning tensors the pipeline passes (the same objects at every step), so
    true CFG's two calls a step, positive and negative prompt, each follow their own table.
    """

    inner: Any
    tables: ModulationTables
    scheduler: Any
    steps: dict[tuple[int, int], StepTable] = field(default_factory=dict)
    mismatch: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, pickle): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timestep = kwargs["timestep"]
        conditioning = Conditioning(
            kwargs["hidden_states"].dtype, timestep, kwargs.get("guidance"), kwargs["pooled_projections"]
        )
        expected, row = self._next_row(conditioning)
        differs = (timestep != expected).any()
        self.mismatch = differs if self.mismatch is None else self.mismatch | differs
        self.tables.rows.set(row)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.tables.rows.active = False

    def verify(self) -> None:
        """Raise if any call's timestep was not its row's (one host sync, after the pipeline's own)."""
        if self.mismatch is not None and bool(self.mismatch.item()):
            raise RuntimeError("a transformer call's timestep differed from its precomputed modulation row")

    def _next_row(self, conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps this conditioning's next call must pass, and its row; a chunk projected as needed."""
        key = (id(conditioning.pooled), id(conditioning.guidance))
        table = self.steps.get(key)
        if table is None:  # kept for the call: the tensors' ids stay theirs
            steps = self.scheduler.timesteps.shape[0]
            per_step = (
                conditioning.timestep.shape[0] * self.tables.rows.width * conditioning.timestep.element_size()
            )
            table = StepTable(conditioning, steps, chunk=max(1, self.tables.table_bytes // per_step))
            self.steps[key] = table
        if table.calls >= table.steps:
            raise RuntimeError(
                f"the transformer was called more often than the {table.steps} scheduled steps"
            )
        if table.rows is None or table.calls >= table.first + table.rows.shape[0]:
            table.first = table.calls
            count = min(table.chunk, table.steps - table.first)
            table.timesteps, table.rows = self._project(table.conditioning, table.first, count, table.chunk)
        assert table.timesteps is not None
        index = table.calls - table.first
        table.calls += 1
        return table.timesteps[index], table.rows[index]

    def _project(
        self, conditioning: Conditioning, first: int, count: int, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps ``first`` to ``first + count``: the timesteps their calls pass and their rows, from the same
        operations on the same values as the transformer's forward (diffusers 0.42.1,
        transformer_flux.py:725-733) and the pipelines' loops, which pass ``t.expand(batch).to(latents.dtype)
        / 1000``."""
        timestep, dtype = conditioning.timestep, conditioning.dtype
        schedule = self.scheduler.timesteps[first : first + count].to(timestep.device)
        batch = timestep.shape[0]
        passed = (schedule.to(timestep.dtype) / 1000)[:, None].expand(count, batch)
        steps = passed.reshape(-1).to(dtype) * 1000
        pooled_rows = conditioning.pooled.repeat(count, 1)
        embedder = self.tables.transformer.time_text_embed
        if conditioning.guidance is None:
            embedding = embedder(steps, pooled_rows)
        else:
            embedding = embedder(steps, conditioning.guidance.to(dtype).repeat(count) * 1000, pooled_rows)
        return passed, self.tables.project_steps(embedding, count, chunk).view(count, batch, -1)


def modulation_layers(transformer: Any) -> list[nn.Module]:
    """FLUX.1's adaLN linears, each fed the transformer's ``temb``: the double blocks' ``norm1`` and
    ``norm1_context``, the single blocks' ``norm``, ``norm_out`` (diffusers 0.42.1)."""
    layers = []
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    layers += [block.norm.linear for block in transformer.single_transformer_blocks]
    return [*layers, transformer.norm_out.linear]


def apply_modulation_tables(transformer: nn.Module) -> ModulationTables | None:
    """Make a resident FLUX.1 transformer's modulation layers read precomputed rows; ``None`` where it
    does not apply (another model, or layers something else already wraps or hooks: offload's streaming,
    a second application). Call before compiling, so the compiled blocks trace the new layers."""
    if type(transformer) is not FluxTransformer2DModel:
        return None
    layers = modulation_layers(transformer)
    if not all(unhooked_linear(layer) for layer in layers):
        return None
    tabled, start = [], 0
    for layer in layers:
        layer.__class__ = TabledLinear
        layer = cast(TabledLinear, layer)
        layer.start = start
        layer.register_buffer("row", torch.empty(0), persistent=False)  # a view of the rows, once set
        start += layer.out_features
        tabled.append(layer)
    rows = ModulationRows(tabled)
    for layer in tabled:
        layer.rows = rows
    return ModulationTables(transformer, tabled, rows)
