"""`ByteBudget`: a bound on the bytes a process has in flight at once, shared by its streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib


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

    def _wake(self) -> None:
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
