"""Webhook delivery records and their state machine, in Redis (each step one atomic script).

Key layout (prefix ``fg:``):
  outbox                     stream  events a job's webhook selected (written by the job store's scripts)
  delivery:{id}              hash    one event to one URL: job_id, event_id, type, url, webhook_id, status,
                                     attempt_count, next_attempt_at, last_status_code, last_error, ...
  delivery:{id}:attempts     list    every attempt, JSON: n, at, duration_ms, status_code, error, outcome
  job:{job_id}:deliveries    list    the job's delivery ids, in event order
  webhook:retries            zset    delivery id → when to hand it to a delivery task (epoch seconds)
  webhook:progress:{job_id}  string  present while the job's progress deliveries are throttled

States: ``pending`` → ``succeeded`` (2xx) | ``stopped`` (410, or the job is gone) | ``failed`` (out of
attempts); a failed attempt with attempts left stays ``pending`` with a later ``next_attempt_at``.
A task claims an attempt with a lease (``begin``): a delivery that is not pending, not due yet, or
leased to another task is skipped, so a duplicated or late message never sends twice.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shared.ids import iso

OUTBOX_KEY = "fg:outbox"
RETRIES_KEY = "fg:webhook:retries"
DELIVER_TASK = "fluxgate.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"
PENDING, SUCCEEDED, STOPPED, FAILED = "pending", "succeeded", "stopped", "failed"


def delivery_key(delivery_id: str) -> str:
    return f"fg:delivery:{delivery_id}"


def attempts_key(delivery_id: str) -> str:
    return f"fg:delivery:{delivery_id}:attempts"


def job_deliveries_key(job_id: str) -> str:
    return f"fg:job:{job_id}:deliveries"


def delivery_id_for(job_id: str, event_id: str) -> str:
    """One delivery per (job, event): re-reading an outbox entry finds the same record."""
    return f"dlv_{job_id}_{event_id}"


def webhook_id_for(job_id: str, event_id: str) -> str:
    """The ``webhook-id`` of an event: the same on every attempt, so receivers can deduplicate."""
    return f"evt_{job_id}_{event_id}"


# KEYS: 1 delivery hash, 2 job hash, 3 job's delivery list, 4 retries zset.
# ARGV: 1 delivery id, 2 webhook id, 3 job id, 4 event id, 5 type, 6 created_at (ISO), 7 now (epoch).
# Returns 1 created, 0 already there, -1 the job or its webhook URL is gone.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local url = redis.call('HGET', KEYS[2], 'webhook_url')
if not url or url == '' then return -1 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'webhook_id', ARGV[2], 'job_id', ARGV[3], 'event_id', ARGV[4],
           'type', ARGV[5], 'url', url, 'status', 'pending', 'attempt_count', 0, 'round_start', 0,
           'created_at', ARGV[6], 'next_attempt_at', ARGV[7])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[1])
return 1
"""

# KEYS: 1 delivery hash. ARGV: 1 now, 2 lease seconds, 3 lease token, 4 early slack seconds.
# Returns {'ok', attempt number, attempt number in this round} or {'skip', reason}.
BEGIN = """
local f = redis.call('HMGET', KEYS[1], 'status', 'next_attempt_at', 'lease_until', 'attempt_count',
                    'round_start')
if not f[1] then return {'skip', 'gone'} end
if f[1] ~= 'pending' then return {'skip', f[1]} end
local now = tonumber(ARGV[1])
if f[3] and f[3] ~= '' and tonumber(f[3]) > now then return {'skip', 'leased'} end
if f[2] and f[2] ~= '' and tonumber(f[2]) > now + tonumber(ARGV[4]) then return {'skip', 'not_due'} end
redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]), 'lease_token', ARGV[3])
local attempt = tonumber(f[4]) + 1
return {'ok', tostring(attempt), tostring(attempt - tonumber(f[5] or '0'))}
"""

# KEYS: 1 delivery hash, 2 its attempts list, 3 retries zset.
# ARGV: 1 lease token, 2 attempt JSON, 3 new status, 4 next attempt (epoch) or '', 5 status code or '',
#       6 error or '', 7 finished_at (ISO), 8 delivery id. Returns 0 when the lease was lost.
FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
if redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[1] then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempt_count', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'next_attempt_at', ARGV[4], 'last_status_code', ARGV[5],
           'last_error', ARGV[6], 'lease_until', '', 'lease_token', '')
if ARGV[3] == 'pending' then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[8])
else
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[7])
  redis.call('ZREM', KEYS[3], ARGV[8])
end
return 1
"""

# KEYS: 1 retries zset. ARGV: 1 now, 2 lease seconds, 3 limit. The due ids, each pushed back by the
# lease: if its task never runs (lost message, dead worker) it comes due again then.
TAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id) end
return ids
"""

# KEYS: 1 delivery hash, 2 retries zset. ARGV: 1 now, 2 delivery id. A fresh round of attempts.
REPLAY = """
local count = redis.call('HGET', KEYS[1], 'attempt_count')
if not count then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending', 'round_start', count, 'next_attempt_at', ARGV[1],
           'lease_until', '', 'lease_token', '')
redis.call('HDEL', KEYS[1], 'finished_at')
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """A task's lease on the next attempt of a delivery."""

    token: str
    attempt: int  # counting every attempt of the delivery
    round_attempt: int  # counting since the delivery was (re)played: indexes the retry schedule


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one attempt, as recorded on the delivery."""

    status: str  # the delivery's new status
    at: str
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None


class DeliveryStore:
    """Delivery records: created from outbox entries, attempted by tasks, read by the job views."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(CREATE)
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)
        self._take_due = client.register_script(TAKE_DUE)
        self._replay = client.register_script(REPLAY)

    def create(self, job_id: str, event_id: str, event_type: str, now: float) -> int:
        """The delivery of one outbox entry, due at once (1 created, 0 existed, -1 job/URL gone)."""
        delivery_id = delivery_id_for(job_id, event_id)
        keys = [delivery_key(delivery_id), f"fg:job:{job_id}", job_deliveries_key(job_id), RETRIES_KEY]
        created = event_time(event_id)
        args = [
            delivery_id,
            webhook_id_for(job_id, event_id),
            job_id,
            event_id,
            event_type,
            created,
            repr(now),
        ]
        return int(self._create(keys=keys, args=args))

    def begin(self, delivery_id: str, now: float, lease_s: float, slack_s: float = 1.0) -> Claim | str:
        """Claim the next attempt for ``lease_s`` seconds; else the reason it is skipped (a string)."""
        token = secrets.token_hex(8)
        args = [repr(now), repr(lease_s), token, repr(slack_s)]
        reply = [_text(part) for part in self._begin(keys=[delivery_key(delivery_id)], args=args)]
        if reply[0] != "ok":
            return reply[1]
        return Claim(token=token, attempt=int(reply[1]), round_attempt=int(reply[2]))

    def finish(self, delivery_id: str, token: str, attempt: dict[str, Any], result: AttemptResult) -> bool:
        """Record an attempt and the delivery's new state; False when the lease had been lost."""
        keys = [delivery_key(delivery_id), attempts_key(delivery_id), RETRIES_KEY]
        args = [
            token,
            json.dumps(attempt, separators=(",", ":")),
            result.status,
            "" if result.next_attempt_at is None else repr(result.next_attempt_at),
            "" if result.status_code is None else str(result.status_code),
            result.error or "",
            result.at,
            delivery_id,
        ]
        return bool(self._finish(keys=keys, args=args))

    def take_due(self, now: float, lease_s: float, limit: int = 100) -> list[str]:
        """Due delivery ids, leased for ``lease_s`` (they come due again if no task records them)."""
        return [_text(i) for i in self._take_due(keys=[RETRIES_KEY], args=[repr(now), repr(lease_s), limit])]

    def reschedule(self, delivery_id: str, when: float) -> None:
        """Hand the delivery to a task at ``when`` (after a failed hand-off)."""
        self.redis.zadd(RETRIES_KEY, {delivery_id: when})

    def unschedule(self, delivery_id: str) -> None:
        self.redis.zrem(RETRIES_KEY, delivery_id)

    def get(self, delivery_id: str) -> dict[str, Any] | None:
        """A delivery with its attempts, as the admin and job views show it; None if unknown."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(delivery_key(delivery_id))
        pipe.lrange(attempts_key(delivery_id), 0, -1)
        fields, attempts = pipe.execute()
        return _public(fields, attempts) if fields else None

    def replay(self, delivery_id: str, now: float) -> bool:
        """Send a delivery again with a fresh round of attempts (admin replay); False if unknown."""
        return bool(
            self._replay(keys=[delivery_key(delivery_id), RETRIES_KEY], args=[repr(now), delivery_id])
        )

    def delete_for_job(self, job_id: str) -> None:
        """Remove every delivery of a job (purge and retention)."""
        ids = [_text(i) for i in self.redis.lrange(job_deliveries_key(job_id), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for delivery_id in ids:
            pipe.delete(delivery_key(delivery_id), attempts_key(delivery_id))
            pipe.zrem(RETRIES_KEY, delivery_id)
        pipe.delete(job_deliveries_key(job_id), f"fg:webhook:progress:{job_id}")
        pipe.execute()


def deliveries_for_job(client: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """Every webhook delivery of a job, oldest first, each with all its attempts."""
    ids = [_text(i) for i in client.lrange(job_deliveries_key(job_id), 0, -1)]
    pipe = client.pipeline(transaction=False)
    for delivery_id in ids:
        pipe.hgetall(delivery_key(delivery_id))
        pipe.lrange(attempts_key(delivery_id), 0, -1)
    replies = pipe.execute()
    pairs = zip(replies[0::2], replies[1::2], strict=True)
    return [_public(fields, attempts) for fields, attempts in pairs if fields]


def event_time(event_id: str) -> str:
    """When a stream entry was added (its id is ``<milliseconds>-<sequence>``), as ISO 8601."""
    millis = int(event_id.split("-", 1)[0])
    return iso(datetime.fromtimestamp(millis / 1000, UTC))


def _public(fields: dict[Any, Any], attempts: list[Any]) -> dict[str, Any]:
    values = {_text(k): _text(v) for k, v in fields.items()}
    next_at = values.get("next_attempt_at")
    return {
        "id": values["id"],
        "object": "webhook_delivery",
        "job_id": values["job_id"],
        "event_id": values["event_id"],
        "webhook_id": values["webhook_id"],
        "type": values["type"],
        "url": values["url"],
        "status": values["status"],
        "attempt_count": int(values.get("attempt_count") or 0),
        "created_at": values.get("created_at"),
        "finished_at": values.get("finished_at") or None,
        "next_attempt_at": iso(datetime.fromtimestamp(float(next_at), UTC)) if next_at else None,
        "last_status_code": int(values["last_status_code"]) if values.get("last_status_code") else None,
        "last_error": values.get("last_error") or None,
        "attempts": [json.loads(_text(a)) for a in attempts],
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
