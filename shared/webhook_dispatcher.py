"""The webhook dispatcher: outbox entries → delivery records → delivery tasks on the ``webhooks`` queue.

It reads ``fg:outbox`` through a Redis consumer group, so an entry stays pending until it is turned
into a delivery record and acknowledged; entries a crashed dispatcher left pending are taken over
with XAUTOCLAIM once idle for ``claim_idle_s``. Creating a record is idempotent (one record per job
and event), so an entry handled twice yields one delivery.

Retries wait in the ``fg:webhook:retries`` sorted set, not in Celery countdowns: with the Redis
broker a message whose ETA lies beyond the visibility timeout is redelivered, and a long countdown
pins the message in a worker's memory. Every loop hands the due deliveries to tasks.

``job.progress`` deliveries are throttled: at most one per job per ``progress_interval_s``; the ones
in between are dropped (the next one, or the terminal event, carries the newer state). Other events
are never throttled or dropped. Any number of dispatchers may run side by side.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from shared.webhook_deliveries import OUTBOX_KEY, RETRIES_KEY, DeliveryStore

log = logging.getLogger("fluxgate.webhooks")

GROUP = "webhook-dispatchers"
PROGRESS_EVENT = "job.progress"
HANDOFF_RETRY_S = 5.0  # a delivery whose task could not be sent (broker down) is tried again after this


def progress_throttle_key(job_id: str) -> str:
    return f"fg:webhook:progress:{job_id}"


@dataclass(frozen=True)
class DispatcherConfig:
    """Timings of the dispatcher loop."""

    progress_interval_s: float = 2.0
    claim_idle_s: float = 30.0  # an entry pending this long with a consumer is presumed orphaned
    send_lease_s: float = 300.0  # a handed-off delivery not recorded by then is handed off again
    block_s: float = 0.5  # longest wait for new entries (also the latency of due retries)
    batch: int = 100
    housekeeping_every_s: float = 60.0  # trim acknowledged outbox entries, forget dead consumers
    dead_consumer_idle_s: float = 3600.0


class Dispatcher:
    """One consumer of the outbox; ``send(delivery_id)`` enqueues the delivery task."""

    def __init__(
        self,
        client: redis.Redis,
        send: Callable[[str], None],
        config: DispatcherConfig | None = None,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self.send = send
        self.config = config or DispatcherConfig()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.clock = clock
        self.deliveries = DeliveryStore(client)
        self._last_claim = 0.0
        self._last_housekeeping = 0.0

    def ensure_group(self) -> None:
        """Create the consumer group (from the start of the outbox) unless it exists."""
        try:
            self.redis.xgroup_create(OUTBOX_KEY, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; Redis outages are logged and waited out."""
        self.ensure_group()
        log.info("webhook dispatcher %s started", self.consumer)
        while not stop.is_set():
            try:
                self.step()
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    log.exception("webhook dispatcher: Redis refused a command; retrying")
                    stop.wait(1.0)
                    continue
                self.ensure_group()  # the outbox was deleted (a flushed database): start over
            except (redis.ConnectionError, redis.TimeoutError) as error:
                log.warning("webhook dispatcher: Redis unavailable (%s); retrying", error)
                stop.wait(1.0)
            except Exception:  # never let the loop die silently while the delivery worker runs on
                log.exception("webhook dispatcher: unexpected error; retrying")
                stop.wait(1.0)
        log.info("webhook dispatcher %s stopped", self.consumer)

    def step(self) -> int:
        """One round: hand off due deliveries, take over orphaned entries, read new ones."""
        now = self.clock()
        work = self.hand_off_due()
        if now - self._last_claim >= min(self.config.claim_idle_s / 2, 5.0):
            self._last_claim = now
            work += self.claim_stale()
        if now - self._last_housekeeping >= self.config.housekeeping_every_s:
            self._last_housekeeping = now
            self.housekeeping()
        return work + self.read_new(self._block_ms())

    def _block_ms(self) -> int:
        """How long to wait for new entries: until the next retry is due, at most ``block_s``."""
        wait = self.config.block_s
        head = self.redis.zrange(RETRIES_KEY, 0, 0, withscores=True)
        if head:
            wait = min(wait, max(float(head[0][1]) - self.clock(), 0.0))
        return max(int(wait * 1000), 1)

    def read_new(self, block_ms: int) -> int:
        """Handle entries no consumer has read yet."""
        reply: Any = self.redis.xreadgroup(
            GROUP, self.consumer, {OUTBOX_KEY: ">"}, count=self.config.batch, block=block_ms
        )
        entries = reply[0][1] if reply else []
        self._handle_all(entries)
        return len(entries)

    def claim_stale(self) -> int:
        """Take over entries another (presumably crashed) dispatcher read but never acknowledged."""
        idle_ms = int(self.config.claim_idle_s * 1000)
        reply: Any = self.redis.xautoclaim(
            OUTBOX_KEY, GROUP, self.consumer, min_idle_time=idle_ms, start_id="0-0", count=self.config.batch
        )
        entries = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
        if entries:
            log.info(
                "webhook dispatcher %s took over %d orphaned outbox entries", self.consumer, len(entries)
            )
        self._handle_all(entries)
        return len(entries)

    def _handle_all(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            self.handle(entry_id, fields)
            self.redis.xack(OUTBOX_KEY, GROUP, entry_id)

    def handle(self, entry_id: str, fields: dict[str, str]) -> None:
        """Turn one outbox entry into a delivery record due now (or drop a throttled progress event)."""
        job_id, event_id, event_type = fields.get("job_id"), fields.get("event_id"), fields.get("type")
        if not (job_id and event_id and event_type):
            log.error("outbox entry %s is malformed, dropped: %s", entry_id, fields)
            return
        if event_type == PROGRESS_EVENT and not self._progress_allowed(job_id):
            return
        if self.deliveries.create(job_id, event_id, event_type, self.clock()) < 0:
            log.info("outbox entry %s: job %s or its webhook is gone, nothing to deliver", entry_id, job_id)

    def _progress_allowed(self, job_id: str) -> bool:
        interval_ms = int(self.config.progress_interval_s * 1000)
        if interval_ms <= 0:
            return True
        return bool(self.redis.set(progress_throttle_key(job_id), "1", nx=True, px=interval_ms))

    def hand_off_due(self) -> int:
        """Send a delivery task for every due delivery."""
        now = self.clock()
        due = self.deliveries.take_due(now, self.config.send_lease_s, self.config.batch)
        for delivery_id in due:
            try:
                self.send(delivery_id)
            except Exception as error:  # the broker is Redis too; try this one again shortly
                log.warning("could not enqueue webhook delivery %s: %s", delivery_id, error)
                self.deliveries.reschedule(delivery_id, now + HANDOFF_RETRY_S)
        return len(due)

    def housekeeping(self) -> None:
        """Trim outbox entries every group has acknowledged; forget idle consumers with nothing pending."""
        floor: str | None = None
        for group in self.redis.xinfo_groups(OUTBOX_KEY):
            pending: Any = self.redis.xpending(OUTBOX_KEY, group["name"])
            oldest = pending["min"] if pending["pending"] else group["last-delivered-id"]
            floor = oldest if floor is None or _stream_id(oldest) < _stream_id(floor) else floor
        if floor and floor != "0-0":
            self.redis.xtrim(OUTBOX_KEY, minid=floor, approximate=False)
        for consumer in self.redis.xinfo_consumers(OUTBOX_KEY, GROUP):
            idle_s = consumer["idle"] / 1000
            mine = consumer["name"] == self.consumer
            if not mine and not consumer["pending"] and idle_s > self.config.dead_consumer_idle_s:
                self.redis.xgroup_delconsumer(OUTBOX_KEY, GROUP, consumer["name"])


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = str(entry_id).partition("-")
    return int(millis), int(sequence or 0)
