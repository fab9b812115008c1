"""Worker registration and heartbeats: the sweeper and the gateway read liveness from them."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

import redis

from shared.ids import now_iso
from shared.workers import WORKERS_KEY, alive_key, worker_key

log = logging.getLogger("fluxgate.heartbeat")


class Heartbeat:
    """A daemon thread that refreshes ``fg:worker:{id}:alive`` (with a TTL) every interval."""

    def __init__(
        self, client: redis.Redis, worker_id: str, info: dict[str, Any], interval_s: float, timeout_s: float
    ) -> None:
        self.redis = client
        self.worker_id = worker_id
        self.info = {"hostname": socket.gethostname(), "pid": str(os.getpid()), **info}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._current_job = ""
        self.jobs_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fluxgate-heartbeat", daemon=True)

    def start(self) -> None:
        fields: dict[Any, Any] = {**self.info, "started_at": now_iso(), "current_job": "", "jobs_done": 0}
        self.redis.hset(worker_key(self.worker_id), mapping=fields)
        self.redis.sadd(WORKERS_KEY, self.worker_id)
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(alive_key(self.worker_id), "1", px=int(self.timeout_s * 1000))
        pipe.hset(
            worker_key(self.worker_id),
            mapping={
                "last_heartbeat": now_iso(),
                "current_job": self._current_job,
                "jobs_done": self.jobs_done,
            },
        )
        pipe.execute()

    def set_current_job(self, job_id: str | Sequence[str] | None) -> None:
        """The job this worker runs now, or the jobs of its batch (shown comma separated); clearing it
        counts each of them as one more job done (any outcome), shown at the next beat (the admin
        workers view). The sweeper does not read it: it requeues every running job whose worker is gone."""
        if not job_id and self._current_job:
            self.jobs_done += len(self._current_job.split(","))
        self._current_job = job_id if isinstance(job_id, str) else ",".join(job_id or ())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except redis.RedisError as error:  # Redis restarts are survivable: beat again next interval.
                log.warning("heartbeat failed: %s", error)

    def stop(self) -> None:
        """Stop beating and deregister (a clean shutdown is not a lost worker)."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(alive_key(self.worker_id), worker_key(self.worker_id))
            pipe.srem(WORKERS_KEY, self.worker_id)
            pipe.execute()
        except redis.RedisError as error:
            log.warning("could not deregister worker %s: %s", self.worker_id, error)
