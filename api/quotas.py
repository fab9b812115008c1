"""Per-key submission quotas, kept in Redis so that every gateway replica enforces the same ones.

Two limits: submissions per key per minute (a fixed one-minute window: one INCR per submission),
and active (queued + running) jobs per owner. Both answer 429 with ``Retry-After`` and rate-limit
headers, which the OpenAI SDK raises as ``RateLimitError``. Reads (polling, listing, events) are not
limited: a client waiting for its job must not be throttled into a timeout.
"""

from __future__ import annotations

import time

from api.services import Services
from shared.errors import ApiError
from shared.keys import Principal

WINDOW_S = 60


def check_submission_rate(services: Services, principal: Principal) -> None:
    """Count this submission in the key's current minute; 429 past the limit."""
    limit = services.settings.limits.submissions_per_minute
    if not limit:
        return
    now = time.time()
    window = int(now // WINDOW_S)
    key = f"fg:rate:{principal.key_id}:{window}"
    pipe = services.redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, WINDOW_S * 2)
    count = int(pipe.execute()[0])
    if count > limit:
        reset = int((window + 1) * WINDOW_S - now) + 1
        raise ApiError(
            429,
            "rate_limit_exceeded",
            f"At most {limit} submissions a minute per API key; retry in {reset} s.",
            headers={
                "Retry-After": str(reset),
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset),
            },
        )


def check_active_jobs(services: Services, principal: Principal) -> None:
    """429 when the owner already has the maximum of queued and running jobs."""
    limit = services.settings.limits.max_active_jobs_per_owner
    if not limit:
        return
    active = services.store.active_jobs(principal.owner)
    if active >= limit:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"At most {limit} queued or running jobs per owner; wait for some to end.",
            headers={"Retry-After": "5", "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0"},
        )
