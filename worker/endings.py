"""Jobs' endings in the background: the images' encoding, upload and the final transition run on threads
while the GPU runs the next job (docs/design.md, "Endings in the background").

A job's ending took 13 ms alone and ~40 ms for a batch of four 1024x1024 JPEGs on lease 71's H100 host,
time in which the GPU waited: the next message was claimed only after the last upload. Handed off here,
the task returns as soon as the pipeline does and the worker claims the next job at once.

Nothing is lost when the process dies with endings pending: the jobs are still ``running`` under this
worker's heartbeat, and the sweeper requeues them when it expires (docs/reliability.md). A warm shutdown
drains them first (``drain``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("fluxgate.endings")

ENDING = "ending"  # run_job's outcome for a job whose ending was handed off


class Endings:
    """Endings handed off to ``threads`` threads; ``drain`` waits for those pending."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ending")
        self._pending: set[Future[str]] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def submit(self, end: Callable[[], str]) -> None:
        """Run ``end`` (which ends one job and never raises) on a thread."""
        future = self._pool.submit(end)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[str]) -> None:
        with self._lock:
            self._pending.discard(future)
            if not self._pending:
                self._idle.notify_all()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every pending ending; whether none is left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d job endings still pending after %.0fs", len(self._pending), timeout_s)
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float) -> None:
        """Drain, then stop the threads (those still ending are left to the sweeper)."""
        self.drain(timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)
