"""The sweeper: a periodic pass over what no single request or worker owns.

Today: ``cancel_after`` deadlines. A queued job past its deadline is canceled with
``deadline_exceeded`` even when no worker serves its model; a running one is flagged and its worker
stops at the next step. (Workers also check the deadline when they claim a job.)
"""

from __future__ import annotations

import logging
import threading
import time

from shared.jobstore import DEADLINE_EXCEEDED, JobStore

log = logging.getLogger("fluxgate.sweeper")


def sweep_deadlines(store: JobStore, now: float | None = None) -> int:
    """Cancel every job whose deadline passed; returns how many were handled."""
    handled = 0
    for job_id in store.due_deadlines(time.time() if now is None else now):
        record = store.cancel(job_id, DEADLINE_EXCEEDED)
        if record is None or record.is_terminal:
            store.forget_deadline(job_id)
        handled += 1
    return handled


def run_sweeper(store: JobStore, interval_s: float, stop: threading.Event) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; Redis outages are logged and retried."""
    while not stop.wait(interval_s):
        try:
            sweep_deadlines(store)
        except Exception as error:  # a Redis restart must not end the sweeper
            log.warning("sweep failed, retrying in %ss: %s", interval_s, error)
