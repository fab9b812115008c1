"""Regional compilation of the transformer's repeated blocks (``--compile``), with a persistent cache.

Compiling only the repeated blocks (FLUX.1: 19 double + 38 single blocks of two classes) costs two
block graphs instead of one whole-model graph, and torch's FX-graph and autograd caches persisted
in ``--compile-cache-dir`` make a restarted worker load its kernels instead of recompiling them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Graphs a repeated block's forward may take before dynamo stops compiling it (a fullgraph compile then
# fails): one per variant the blocks trace (the single blocks: the first, the others and the last, each
# gated or with its gating deferred to the next block, ``epilogues.defer_gating``: six), and from a second
# resolution on a dynamic-shape one each. Dynamo's default is 8.
RECOMPILE_LIMIT = 32


@dataclass(frozen=True)
class CompileConfig:
    mode: str | None = None
    cache_dir: str | None = None
    backend: str = "inductor"
    fullgraph: bool = True


def configure_compile_cache(cache_dir: str) -> None:
    """Point inductor's caches at ``cache_dir`` (read by torch when it compiles, so set before), and quack's
    (``--quack-gating``: its compiled GEMMs and their autotuning, read when quack is first imported, at the
    first gated call) at a folder inside it."""
    path = Path(cache_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    os.environ["QUACK_CACHE_DIR"] = str(path / "quack")


def apply_regional_compile(pipe: Any, config: CompileConfig) -> None:
    """Compile each repeated transformer block; graphs are built on the first call (the warm-up)."""
    if config.cache_dir:
        configure_compile_cache(config.cache_dir)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    kwargs: dict[str, Any] = {"fullgraph": config.fullgraph, "backend": config.backend}
    if config.mode:
        kwargs["mode"] = config.mode
    pipe.transformer.compile_repeated_blocks(**kwargs)
