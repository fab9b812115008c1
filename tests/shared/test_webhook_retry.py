"""Webhook retry policy: the schedule, jitter, Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from shared.webhook_retry import DEFAULT_SCHEDULE_S, RetryPolicy, parse_retry_after, parse_schedule


def test_the_default_schedule_spans_hours() -> None:
    schedule = parse_schedule(DEFAULT_SCHEDULE_S)
    assert schedule[0] == 5 and schedule[-1] == 8 * 3600
    assert list(schedule) == sorted(schedule)
    assert sum(schedule) / 3600 > 12
    assert RetryPolicy(schedule).max_attempts == 10


@pytest.mark.parametrize("value", ["5,abc", "5,-1", "5,999999999"])
def test_bad_schedules_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="webhook retry schedule"):
        parse_schedule(value)


def test_settings_refuse_a_bad_schedule_and_bad_cidrs() -> None:
    from shared.settings import load_settings

    with pytest.raises(ValueError, match="webhook retry schedule"):
        load_settings(webhook_retry_schedule_s="1,x")
    with pytest.raises(ValueError, match="is not a CIDR"):
        load_settings(outbound_allow_cidrs="127.0.0.0/8,localhost")
    assert load_settings(outbound_allow_cidrs="127.0.0.0/8, ::1/128").outbound_allow_cidrs


def test_delays_follow_the_schedule_within_the_jitter_band() -> None:
    policy = RetryPolicy((10.0, 100.0), jitter=0.5)
    rng = random.Random(1)
    first = [policy.delay(1, rng=rng) for _ in range(200)]
    second = [policy.delay(2, rng=rng) for _ in range(200)]
    assert all(d is not None and 5 <= d <= 10 for d in first)
    assert all(d is not None and 50 <= d <= 100 for d in second)
    assert len({round(d or 0, 3) for d in first}) > 100  # actually spread


def test_full_jitter_and_no_jitter() -> None:
    rng = random.Random(2)
    full = [RetryPolicy((10.0,), jitter=1.0).delay(1, rng=rng) or 0 for _ in range(500)]
    assert min(full) < 1 and max(full) > 9
    assert RetryPolicy((10.0,), jitter=0).delay(1) == 10


def test_attempts_beyond_the_schedule_give_up() -> None:
    policy = RetryPolicy((1.0, 2.0))
    assert policy.delay(2) is not None
    assert policy.delay(3) is None
    assert RetryPolicy(()).delay(1) is None


def test_retry_after_is_a_lower_bound_capped_at_the_longest_step() -> None:
    policy = RetryPolicy((10.0, 60.0), jitter=0)
    assert policy.delay(1, retry_after=30) == 30
    assert policy.delay(1, retry_after=2) == 10
    assert policy.delay(1, retry_after=86400) == 60


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 25, 21, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 7 ") == 7
    assert parse_retry_after("Wed, 25 Nov 2026 21:01:30 GMT", now) == 90
    assert parse_retry_after("Wed, 25 Nov 2026 20:00:00 GMT", now) == 0  # in the past: now
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert parse_retry_after(bad, now) is None
