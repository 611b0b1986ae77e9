"""WaitDeadlines: many waits of one length under one timer (the hellos of a mass join)."""

from __future__ import annotations

import asyncio

import pytest

from metis_async.deadlines import WaitDeadlines


async def _wait(
    deadlines: WaitDeadlines, seconds: float, outcome: dict[str, str], name: str
) -> None:
    task = asyncio.current_task()
    assert task is not None
    deadlines.start(task)
    try:
        await asyncio.sleep(seconds)
        outcome[name] = "done"
    except asyncio.CancelledError:
        if not deadlines.expired(task):
            outcome[name] = "cancelled"
            raise
        await asyncio.sleep(0)  # the task goes on after its deadline's cancellation
        outcome[name] = "expired"
    finally:
        deadlines.end(task)


def test_only_the_waits_still_running_at_their_deadline_are_cut_short() -> None:
    outcome: dict[str, str] = {}

    async def main() -> float:
        deadlines = WaitDeadlines(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = asyncio.create_task(_wait(deadlines, 5.0, outcome, "slow"))
        await asyncio.sleep(0.05)
        quick = asyncio.create_task(_wait(deadlines, 0.01, outcome, "quick"))
        late = asyncio.create_task(_wait(deadlines, 5.0, outcome, "late"))
        await slow
        cut = loop.time() - started
        await asyncio.gather(quick, late)
        assert len(deadlines) == 0
        deadlines.close()
        return cut

    cut = asyncio.run(main())

    assert outcome == {"quick": "done", "slow": "expired", "late": "expired"}
    assert 0.19 <= cut < 1.0  # at its own deadline, not another's


def test_a_cancellation_from_elsewhere_is_not_a_deadline() -> None:
    outcome: dict[str, str] = {}

    async def main() -> None:
        deadlines = WaitDeadlines(5.0)
        task = asyncio.create_task(_wait(deadlines, 5.0, outcome, "waiting"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadlines.close()

    asyncio.run(main())

    assert outcome == {"waiting": "cancelled"}


def test_a_wait_needs_a_positive_length() -> None:
    with pytest.raises(ValueError, match="positive"):
        WaitDeadlines(0.0)
