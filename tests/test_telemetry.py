"""Log hygiene: repeated learner errors are rate-limited, long identities are shortened."""

from __future__ import annotations

import pytest

from metis_async.telemetry import ID_LOG_CHARS, LogLimiter, short_id


def test_a_burst_is_logged_then_the_rest_is_counted_as_suppressed() -> None:
    limiter = LogLimiter(burst=3, per_minute=0.0)

    allowed = [limiter.allow("noisy", "learner_error") for _ in range(1000)]

    assert allowed[:3] == [True, True, True]
    assert not any(allowed[3:])
    assert limiter.suppressed("noisy", "learner_error") == 997
    assert limiter.suppressed("noisy", "learner_error") == 0  # reset once reported


def test_one_noisy_learner_does_not_silence_another() -> None:
    limiter = LogLimiter(burst=1, per_minute=0.0)
    limiter.allow("noisy", "learner_error")
    limiter.allow("noisy", "learner_error")

    assert limiter.allow("quiet", "learner_error")
    assert limiter.allow("noisy", "protocol_violation")


def test_tokens_come_back_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("metis_async.telemetry.time.monotonic", lambda: now[0])
    limiter = LogLimiter(burst=1, per_minute=6.0)  # one line every 10 s
    assert limiter.allow("a", "e")
    assert not limiter.allow("a", "e")

    now[0] += 10.0

    assert limiter.allow("a", "e")


def test_tracked_pairs_are_bounded() -> None:
    limiter = LogLimiter(tracked=100)

    for i in range(10_000):
        limiter.allow(f"learner-{i}", "learner_error")

    assert len(limiter._buckets) == 100


def test_long_learner_ids_are_shortened_in_logs() -> None:
    hostile = "x" * 100_000

    shown = short_id(hostile)

    assert len(shown) < ID_LOG_CHARS + 20
    assert shown.startswith("x" * ID_LOG_CHARS)
    assert str(100_000 - ID_LOG_CHARS) in shown
    assert short_id("hospital-7") == "hospital-7"
