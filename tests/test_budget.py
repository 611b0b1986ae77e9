"""ByteBudget (the bound on large messages handed to gRPC at once) and ReceiptLedger (chunks
held until the learner acknowledges them), both used by streams.py."""

from __future__ import annotations

import asyncio

import pytest

from metis_async.budget import ByteBudget, ReceiptLedger


def test_requests_within_the_limit_are_granted_at_once() -> None:
    async def scenario() -> int:
        budget = ByteBudget(10)
        await budget.acquire(4)
        await budget.acquire(6)
        return budget.held

    assert asyncio.run(scenario()) == 10


def test_a_request_waits_until_enough_is_released() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(10)
        order: list[str] = []
        first = await budget.acquire(8)

        async def second() -> None:
            await budget.acquire(5)
            order.append("second granted")

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0)
        order.append("first released")
        budget.release(first)
        await task
        return order

    assert asyncio.run(scenario()) == ["first released", "second granted"]


def test_waiters_are_served_first_come_first_served() -> None:
    async def scenario() -> list[int]:
        budget = ByteBudget(10)
        held = await budget.acquire(10)
        granted: list[int] = []

        async def want(n: int) -> None:
            granted.append(await budget.acquire(n))

        tasks = [asyncio.ensure_future(want(n)) for n in (9, 1)]
        await asyncio.sleep(0)
        budget.release(held)  # 10 free: 9 first; the 1 behind it fits too
        await asyncio.gather(*tasks)
        return granted

    assert asyncio.run(scenario()) == [9, 1]


def test_a_request_larger_than_the_limit_takes_the_whole_budget() -> None:
    async def scenario() -> tuple[int, int]:
        budget = ByteBudget(10)
        size = await budget.acquire(1_000)
        return size, budget.held

    assert asyncio.run(scenario()) == (10, 10)


def test_a_cancelled_waiter_lets_the_next_one_through() -> None:
    async def scenario() -> int:
        budget = ByteBudget(10)
        await budget.acquire(6)
        big = asyncio.ensure_future(budget.acquire(10))  # waits for everything
        small = asyncio.ensure_future(budget.acquire(4))  # fits, but queued behind `big`
        await asyncio.sleep(0)
        assert not small.done()
        big.cancel()
        await asyncio.sleep(0)
        return await asyncio.wait_for(small, 1.0)

    assert asyncio.run(scenario()) == 4


def test_a_non_positive_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="positive limit"):
        ByteBudget(0)


# ------------------------------------------------------------------------- download receipts


def test_a_ledger_holds_written_chunks_budget_until_their_receipt() -> None:
    async def scenario() -> tuple[int, int]:
        budget = ByteBudget(10)
        ledger = ReceiptLedger(budget)
        for index in range(3):
            ledger.written(7, index, await budget.acquire(2), now=0.0)
        held_before = budget.held
        ledger.received(7, 2, now=1.0)  # chunks 0 and 1
        return held_before, budget.held

    assert asyncio.run(scenario()) == (6, 2)


def test_a_full_window_waits_for_a_receipt() -> None:
    async def scenario() -> list[str]:
        ledger = ReceiptLedger(ByteBudget(100), window=2)
        ledger.written(1, 0, 0, now=0.0)
        ledger.written(1, 1, 0, now=0.0)
        order: list[str] = []

        async def writer() -> None:
            await ledger.room()
            order.append("room")

        task = asyncio.ensure_future(writer())
        await asyncio.sleep(0)
        order.append("receipt")
        ledger.received(1, 1, now=1.0)
        await asyncio.wait_for(task, 1.0)
        return order

    assert asyncio.run(scenario()) == ["receipt", "room"]


def test_a_receipt_for_a_newer_version_covers_every_older_chunk() -> None:
    budget = ByteBudget(10)
    ledger = ReceiptLedger(budget)
    budget.held = 6
    ledger.written(1, 0, 3, now=0.0)
    ledger.written(2, 0, 3, now=0.0)

    ledger.received(2, 0, now=1.0)  # nothing of version 2 yet, all of version 1

    assert (len(ledger), budget.held) == (1, 3)


def test_receipts_for_chunks_never_sent_are_ignored() -> None:
    budget = ByteBudget(10)
    ledger = ReceiptLedger(budget)
    budget.held = 3
    ledger.written(5, 0, 3, now=0.0)

    ledger.received(4, 99, now=1.0)  # an older version: nothing outstanding of it

    assert (len(ledger), budget.held, ledger.acknowledged) == (1, 3, 0)


def test_a_ledger_without_progress_is_stalled() -> None:
    ledger = ReceiptLedger(ByteBudget(10))
    ledger.written(1, 0, 0, now=5.0)
    ledger.written(1, 1, 0, now=9.0)

    ledger.received(1, 1, now=12.0)  # progress at 12

    assert (ledger.stalled(before=11.0), ledger.stalled(before=13.0)) == (False, True)


def test_releasing_a_ledger_gives_everything_back() -> None:
    budget = ByteBudget(10)
    ledger = ReceiptLedger(budget)
    budget.held = 7
    ledger.written(1, 0, 3, now=0.0)
    ledger.written(1, 1, 4, now=0.0)

    ledger.release_all()

    assert (len(ledger), budget.held, ledger.stalled(before=1.0)) == (0, 0, False)


def test_a_share_released_within_a_time_goes_back_when_the_holder_is_stuck() -> None:
    async def scenario() -> tuple[int, int, int]:
        budget = ByteBudget(10)
        give_back = budget.release_within(await budget.acquire(10), 0.05)
        held_at_first = budget.held
        await asyncio.wait_for(budget.acquire(10), 5.0)  # the stuck holder never gave back
        held_after_the_timeout = budget.held
        give_back()  # the stuck write completes at last: nothing more goes back
        return held_at_first, held_after_the_timeout, budget.held

    assert asyncio.run(scenario()) == (10, 10, 10)


def test_a_share_given_back_in_time_goes_back_once() -> None:
    async def scenario() -> tuple[int, int]:
        budget = ByteBudget(10)
        give_back = budget.release_within(await budget.acquire(6), 0.05)
        give_back()
        released = budget.held
        await asyncio.sleep(0.1)  # the timer must not give it back a second time
        return released, budget.held

    assert asyncio.run(scenario()) == (0, 0)


def test_stuck_shares_of_one_duration_all_go_back_in_time() -> None:
    async def scenario() -> tuple[int, int]:
        budget = ByteBudget(9)
        holds = [budget.release_within(await budget.acquire(3), 0.05) for _ in range(3)]
        holds[1]()  # the middle write completes; the other two stay stuck
        held_before = budget.held
        await asyncio.wait_for(budget.acquire(9), 5.0)  # both stuck shares expire
        for hold in holds:
            hold()  # late completions give nothing back twice
        return held_before, budget.held

    assert asyncio.run(scenario()) == (6, 9)


def test_waiting_for_no_contention_returns_at_once_when_nothing_waits() -> None:
    async def scenario() -> bool:
        budget = ByteBudget(10)
        await budget.acquire(10)  # full, but nobody waits for room
        await asyncio.wait_for(budget.wait_uncontended(), 1.0)
        return budget.contended

    assert asyncio.run(scenario()) is False


def test_waiting_for_no_contention_ends_when_the_waiters_are_served() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(10)
        order: list[str] = []
        first = await budget.acquire(10)

        async def writer() -> None:
            budget.release(await budget.acquire(10))
            order.append("writer served")

        async def reader() -> None:
            await budget.wait_uncontended()
            order.append("reader goes on")

        tasks = [asyncio.ensure_future(writer())]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(reader()))
        await asyncio.sleep(0.01)
        order.append("first released")
        budget.release(first)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["first released", "writer served", "reader goes on"]
