"""Per-key submission quotas, kept in Redis so that every gateway replica enforces the same ones.

Three limits: queued jobs per model, active (queued + running) jobs per owner, and submissions per key
per minute (a fixed one-minute window: one INCR per admitted-so-far submission). A submission without
reference images is checked inside its one ``SUBMIT`` script (:func:`quotas_for`, :func:`quota_error`);
one with reference images is checked first (:func:`check_quotas`), before its images are stored. All
answer 429 with ``Retry-After`` (and rate-limit headers for the per-key and per-owner limits), which the
OpenAI SDK raises as ``RateLimitError``. Reads (polling, listing, events) are not limited: a client
waiting for its job must not be throttled into a timeout.
"""

from __future__ import annotations

import time

from api.services import Services
from shared.errors import ApiError
from shared.jobstore import QuotaExceeded, Quotas
from shared.keys import Principal
from shared.settings import Limits

WINDOW_S = 60


def quotas_for(limits: Limits, principal: Principal, now: float) -> Quotas:
    """The quotas a submission at ``now`` (Unix seconds) is admitted under."""
    rate_key = ""
    if limits.submissions_per_minute:
        rate_key = f"fg:rate:{principal.key_id}:{int(now // WINDOW_S)}"
    return Quotas(
        max_queued_jobs=limits.max_queued_jobs_per_model,
        max_active_jobs=limits.max_active_jobs_per_owner,
        rate_key=rate_key,
        rate_limit=limits.submissions_per_minute,
        rate_ttl_s=WINDOW_S * 2,
    )


def quota_error(refused: QuotaExceeded, limits: Limits, model: str, now: float) -> ApiError:
    """The 429 for a quota the submit script refused."""
    if refused.reason == "queue_full":
        return queue_full(limits, model)
    if refused.reason == "too_many_active_jobs":
        return too_many_active_jobs(limits.max_active_jobs_per_owner)
    return rate_limited(limits.submissions_per_minute, now)


def queue_full(limits: Limits, model: str) -> ApiError:
    return ApiError(
        429,
        "queue_full",
        f"The queue of the model {model!r} is full; retry later.",
        "model",
        headers={"Retry-After": str(limits.queue_full_retry_after_s)},
    )


def too_many_active_jobs(limit: int) -> ApiError:
    return ApiError(
        429,
        "too_many_active_jobs",
        f"At most {limit} queued or running jobs per owner; wait for some to end.",
        headers={"Retry-After": "5", "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0"},
    )


def rate_limited(limit: int, now: float) -> ApiError:
    reset = int((int(now // WINDOW_S) + 1) * WINDOW_S - now) + 1
    return ApiError(
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


def check_quotas(services: Services, principal: Principal, model: str) -> None:
    """Check the three quotas in the script's order, in separate round trips (a submission with reference
    images, checked before they are stored); 429 on the first that refuses."""
    limits = services.settings.limits
    if (
        limits.max_queued_jobs_per_model
        and services.store.queue_depth(model) >= limits.max_queued_jobs_per_model
    ):
        raise queue_full(limits, model)
    active_limit = limits.max_active_jobs_per_owner
    if active_limit and services.store.active_jobs(principal.owner) >= active_limit:
        raise too_many_active_jobs(active_limit)
    if not limits.submissions_per_minute:
        return
    now = time.time()
    key = quotas_for(limits, principal, now).rate_key
    pipe = services.redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, WINDOW_S * 2)
    if int(pipe.execute()[0]) > limits.submissions_per_minute:
        raise rate_limited(limits.submissions_per_minute, now)
