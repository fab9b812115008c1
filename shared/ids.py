"""Identifiers and timestamps.

Job ids are time-ordered (48-bit milliseconds + 80 random bits, Crockford base32, like a ULID), so
that sorting ids sorts jobs by creation: listings page through a Redis sorted set by id alone.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from datetime import UTC, datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
JOB_ID_PATTERN = re.compile(r"^job_[0-9A-HJKMNP-TV-Z]{26}$")


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


_last = [0, 0]  # the last (milliseconds, random part) issued by this process
_lock = threading.Lock()


def new_job_id() -> str:
    """A new job id, ``job_`` + 26 characters, ordered by creation time.

    Within one millisecond a process increments the random part (as monotonic ULIDs do), so the
    ids one gateway issues sort in issue order.
    """
    with _lock:
        millis = int(time.time() * 1000)
        if millis <= _last[0]:
            millis, random_part = _last[0], _last[1] + 1
        else:
            random_part = secrets.randbits(79)  # leaves headroom for increments before 80 bits overflow
        _last[:] = [millis, random_part]
    return "job_" + _base32(millis, 10) + _base32(random_part, 16)


def job_id_bound(moment: datetime, upper: bool) -> str:
    """The smallest (or largest) job id created at ``moment``'s millisecond, for id-range queries."""
    millis = int(moment.timestamp() * 1000)
    return "job_" + _base32(millis, 10) + ("Z" * 16 if upper else "0" * 16)


def job_id_millis(job_id: str) -> int:
    """The creation time of a job id, in Unix milliseconds (its first 10 characters)."""
    return sum(_CROCKFORD.index(char) * 32**power for power, char in enumerate(reversed(job_id[4:14])))


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the shape of a job id (anything else is a 404 without a Redis round trip)."""
    return bool(JOB_ID_PATTERN.match(value))


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, millisecond precision: ``2026-11-25T21:00:00.123Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def now_iso() -> str:
    return iso(utcnow())
