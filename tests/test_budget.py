"""ByteBudget: the bound on large messages handed to gRPC at once (streams.py)."""

from __future__ import annotations

import asyncio

import pytest

from metis_async.budget import ByteBudget


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
