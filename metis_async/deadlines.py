"""One timer for many waits of the same length: the hellos of a mass join.

`asyncio.timeout` around each stream's first read builds a `Timeout`, schedules a timer handle
and cancels it again: ~18 µs of the event loop per join (py-spy at 100 Hz, 15,000 learners
joining in benches/load.py: 27 samples, against 7 for this class's start and end). Waits that
all last `seconds` expire in the order they started, so one insertion-ordered dict and one
timer for its oldest entry serve them all: starting and ending a wait is a dict insert and
delete.
"""

from __future__ import annotations

import asyncio


class WaitDeadlines:
    """Tasks waiting at most `seconds` each; a task still waiting then is cancelled.

    A task calls `start` before its wait and `end` after it (in a `finally`); when its wait is
    cut short by a `CancelledError`, `expired` says whether that was the deadline (and takes
    back the cancellation's count, so the task can go on to report it) or someone else.

    Args:
        seconds: how long each wait may last (> 0).
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"a wait deadline needs a positive length, got {seconds}")
        self.seconds = seconds
        self._waiting: dict[asyncio.Task[object], float] = {}  # oldest first
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def start(self, task: asyncio.Task[object]) -> None:
        """`task` starts waiting (on the running loop)."""
        deadline = asyncio.get_running_loop().time() + self.seconds
        self._waiting[task] = deadline
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._sweep)

    def end(self, task: asyncio.Task[object]) -> None:
        """`task` stopped waiting, however it ended."""
        self._waiting.pop(task, None)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """Whether `task` was cancelled because its deadline passed (once: it is forgotten)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
        if uncancel is not None:
            uncancel()
        return True

    def close(self) -> None:
        """Stop the timer (the tasks still waiting are left alone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        waiting = self._waiting
        while waiting:
            task, deadline = next(iter(waiting.items()))
            if deadline > now:
                self._timer = asyncio.get_running_loop().call_at(deadline, self._sweep)
                return
            del waiting[task]
            if not task.done():
                self._expired.add(task)
                task.cancel()
