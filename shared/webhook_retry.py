"""When a failed webhook delivery is tried again: a backoff schedule with jitter, and ``Retry-After``.

The schedule (``FLUXGATE_WEBHOOK_RETRY_SCHEDULE_S``) lists the delay before each retry; its length
bounds the attempts (1 + entries). The default roughly doubles from 5 s to 8 h, about 15 h in all.
Each delay is randomised downwards by ``jitter`` (1.0 is AWS's "full jitter", uniform in [0, d]; the
default 0.5 draws from [d/2, d], which keeps the schedule spanning hours while still spreading the
retries of many deliveries that failed together). A ``Retry-After`` header (seconds or an HTTP date)
is honoured as a lower bound, capped at the schedule's longest step so that a receiver cannot park a
delivery for days.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

DEFAULT_SCHEDULE_S = "5,30,120,600,1800,3600,7200,14400,28800"


def parse_schedule(value: str) -> tuple[float, ...]:
    """``"5,30,120"`` → ``(5.0, 30.0, 120.0)``; raises ValueError on a bad or negative entry."""
    steps: list[float] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        try:
            step = float(entry)
        except ValueError:
            raise ValueError(f"webhook retry schedule: {entry!r} is not a number of seconds") from None
        if not 0 <= step <= 7 * 24 * 3600:
            raise ValueError(f"webhook retry schedule: {entry} is not between 0 and 7 days")
        steps.append(step)
    return tuple(steps)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date); None if absent/bad."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - (now or datetime.now(UTC))).total_seconds(), 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a delivery gets and how long to wait between them."""

    schedule: tuple[float, ...]
    jitter: float = 0.5

    @classmethod
    def from_setting(cls, schedule: str, jitter: float = 0.5) -> RetryPolicy:
        return cls(parse_schedule(schedule), jitter)

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.schedule)

    def delay(
        self, failed_attempts: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds until the next attempt after ``failed_attempts`` failures, or None: give up."""
        if failed_attempts < 1 or failed_attempts > len(self.schedule):
            return None
        step = self.schedule[failed_attempts - 1]
        delay = step * (1.0 - self.jitter * (rng or random).random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.schedule)))
        return delay
