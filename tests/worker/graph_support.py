"""Recorders with a CUDA graph's semantics, for the graphs' CPU tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._pytree import tree_leaves


class RerunRecorder:
    """A CUDA graph's semantics on the CPU: replays recompute from the same buffers into the same outputs."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, run: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        self.captures += 1
        outputs = run()

        def replay() -> None:
            self.replays += 1
            fresh = run()
            for static, new in zip(tree_leaves(outputs), tree_leaves(fresh), strict=True):
                static.copy_(new)

        return replay, outputs


class FailingRecorder:
    def __init__(self) -> None:
        self.captures = 0

    def capture(self, run: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        self.captures += 1
        raise RuntimeError("operation not permitted when stream is capturing")
