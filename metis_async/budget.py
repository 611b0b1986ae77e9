"""`ByteBudget`: a bound on the bytes a process has in flight at once, shared by its streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable


class ByteBudget:
    """At most `limit` bytes held at once, handed out in arrival order (on one event loop).

    A stream acquires the size of a large message before it hands it to gRPC and releases it
    when gRPC has taken it, so a version broadcast to thousands of streams costs the
    controller `limit` bytes of send buffers, not one model per stream. A request larger than
    the whole budget waits until nothing else is held and then takes it all, so it never
    deadlocks.

    Args:
        limit: bytes (> 0).
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a byte budget needs a positive limit, got {limit}")
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._uncontended: list[asyncio.Future[None]] = []
        # `release_within`'s holds in expiry order, and the timer of the first, by duration
        self._holds: dict[float, collections.deque[_Hold]] = {}
        self._expiry: dict[float, asyncio.TimerHandle | None] = {}

    @property
    def contended(self) -> bool:
        """Whether requests are waiting for room (the budget is the bottleneck right now)."""
        return bool(self._waiters)

    async def wait_uncontended(self) -> None:
        """Return once no request waits for room (at once when none does)."""
        if not self._waiters:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._uncontended.append(future)
        await future

    async def acquire(self, nbytes: int) -> int:
        """Wait until `nbytes` (capped at the limit) fit; returns what to `release`."""
        size = min(nbytes, self.limit)
        if not self._waiters and self.held + size <= self.limit:
            self.held += size
            return size
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # the waiter behind it may fit now
            else:
                self.release(size)  # granted just as it was cancelled: give it back
            raise
        return size

    def release(self, size: int) -> None:
        """Give back what `acquire` returned."""
        self.held -= size
        self._wake()

    def release_within(self, size: int, seconds: float) -> Callable[[], None]:
        """Give back `size` (what `acquire` returned) after `seconds` at the latest, or when the
        returned function is called first; either way once.

        For holders that may be stuck (a write to a learner that does not read): the bytes
        they hold stay theirs, but they stop holding everyone else back. One timer serves every
        hold of the same `seconds` (a broadcast makes one hold per stream): they expire in the
        order they were made.
        """
        loop = asyncio.get_running_loop()
        hold = _Hold(self, size, loop.time() + seconds)
        holds = self._holds.setdefault(seconds, collections.deque())
        while holds and not holds[0].size:  # given back already: no need to keep them
            holds.popleft()
        holds.append(hold)
        if self._expiry.get(seconds) is None:
            self._expiry[seconds] = loop.call_at(hold.deadline, self._expire, seconds)
        return hold

    def _expire(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        holds, now = self._holds[seconds], loop.time()
        while holds and holds[0].deadline <= now:
            holds.popleft()()
        self._expiry[seconds] = (
            loop.call_at(holds[0].deadline, self._expire, seconds) if holds else None
        )

    def _wake(self) -> None:
        self._grant()
        if not self._waiters and self._uncontended:
            waiting, self._uncontended = self._uncontended, []
            for future in waiting:
                if not future.done():  # not cancelled
                    future.set_result(None)

    def _grant(self) -> None:
        while self._waiters:
            size, future = self._waiters[0]
            if future.done():  # cancelled, not yet removed
                self._waiters.popleft()
                continue
            if self.held + size > self.limit:
                return  # first come, first served: later, smaller requests wait too
            self._waiters.popleft()
            self.held += size
            future.set_result(None)


class _Hold:
    """A share of a `ByteBudget` that goes back when called or at `deadline` (loop time),
    whichever comes first (`ByteBudget.release_within`)."""

    __slots__ = ("budget", "deadline", "size")

    def __init__(self, budget: ByteBudget, size: int, deadline: float) -> None:
        self.budget, self.size, self.deadline = budget, size, deadline

    def __call__(self) -> None:
        if self.size:
            size, self.size = self.size, 0
            self.budget.release(size)


RECEIPT_WINDOW_CHUNKS = 16
"""Chunks of a model a learner may leave unacknowledged before its stream sends no more
(DOWNLOAD RECEIPTS in the proto)."""


class ReceiptLedger:
    """The model chunks written to one learner that it has not acknowledged yet.

    For a learner that acknowledges downloads (`ModelReceived`), a chunk's share of the send
    budget stays held after gRPC has taken the chunk, until the learner says it has it: so the
    budget bounds the bytes on their way to learners, wherever they wait (gRPC's buffers, the
    kernel's), not just the bytes being handed to gRPC. At most `window` chunks are outstanding,
    so one learner never holds the budget alone.

    Args:
        budget: the process's send budget the chunks were taken from.
        window: chunks outstanding at most.
    """

    __slots__ = ("_entries", "_waiter", "acknowledged", "budget", "since", "window")

    def __init__(self, budget: ByteBudget, window: int = RECEIPT_WINDOW_CHUNKS) -> None:
        self.budget = budget
        self.window = window
        # (version, chunk index, budget bytes held) per outstanding chunk; made on the first
        # write and dropped when empty: an idle stream keeps no deque (~760 bytes each).
        self._entries: collections.deque[tuple[int, int, int]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.since = 0.0  # loop time of the oldest outstanding chunk's write, or last progress
        self.acknowledged = 0  # receipts that freed chunks (they are exempt from rate limits)

    def __len__(self) -> int:
        return len(self._entries) if self._entries else 0

    async def room(self) -> None:
        """Wait until fewer than `window` chunks are outstanding."""
        while len(self) >= self.window:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def written(self, version: int, index: int, held: int, now: float) -> None:
        """Chunk `index` of model `version` was handed to gRPC holding `held` budget bytes."""
        entries = self._entries
        if not entries:
            self.since = now
            if entries is None:
                entries = self._entries = collections.deque()
        entries.append((version, index, held))

    def received(self, version: int, chunks: int, now: float) -> None:
        """The learner holds the first `chunks` chunks of `version` (and every older model)."""
        entries = self._entries
        if not entries:
            return  # nothing outstanding
        before, freed = len(entries), 0
        while entries and (
            entries[0][0] < version or (entries[0][0] == version and entries[0][1] < chunks)
        ):
            freed += entries.popleft()[2]
        if len(entries) == before:
            return  # nothing outstanding was acknowledged
        if not entries:
            self._entries = None
        self.acknowledged += 1
        self.since = now
        if freed:
            self.budget.release(freed)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stalled(self, before: float) -> bool:
        """Whether a chunk has waited for its receipt, with no progress, since before `before`."""
        return bool(self._entries) and self.since < before

    def release_all(self) -> None:
        """The stream ended: give back everything still held."""
        entries, self._entries = self._entries, None
        freed = sum(held for _, _, held in entries) if entries else 0
        if freed:
            self.budget.release(freed)
