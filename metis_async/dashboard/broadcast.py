"""One summary snapshot per interval, shared by every open dashboard (server-sent events).

`SummaryBroadcast` asks the source for its summary once per interval, encodes it once as an SSE
frame, and wakes every subscriber. A subscriber that falls behind skips to the latest frame
rather than queueing stale ones, so a slow browser costs nothing but its own socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import structlog

from metis_async.dashboard.source import DashboardSource

log = structlog.get_logger("metis_async.dashboard")


def _plain(value: object) -> object:
    """`value` for JSON: numpy scalars as Python numbers, non-finite floats as null."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (dict, list, tuple, str)):
        value = item()  # a numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _numpy_scalar(value: object) -> object:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_json(value: object) -> bytes:
    """`value` as compact JSON that browsers parse: NaN and infinities (a diverged loss) become
    null, numpy scalars plain numbers."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_numpy_scalar)
    except ValueError:  # a non-finite float somewhere: the rare path walks the whole value
        text = json.dumps(_plain(value), separators=(",", ":"), allow_nan=False)
    return text.encode()


def sse_frame(event: str, data: bytes) -> bytes:
    """One server-sent event; `data` must hold no newline (compact JSON has none)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class SummaryBroadcast:
    """Publishes `source.summary()` as an SSE frame every `interval_seconds` while anyone listens.

    Args:
        source: the dashboard's data source.
        interval_seconds: time between snapshots (seconds).
    """

    def __init__(self, source: DashboardSource, interval_seconds: float) -> None:
        self._source = source
        self._interval = interval_seconds
        self._frame: bytes | None = None
        self._frame_time = -math.inf  # time.monotonic() of the frame
        self._sequence = 0  # bumped by every frame; subscribers remember the last one they sent
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._closed = False
        self.snapshots = 0
        """How many times the source was asked for a summary (for tests and metrics)."""

    @property
    def subscribers(self) -> int:
        """Open event streams."""
        return self._subscribers

    def publish(self) -> None:
        """Take a snapshot now and wake every subscriber; a failing source keeps the last one."""
        self.snapshots += 1
        try:
            data = encode_json(self._source.summary())
        except Exception:  # the source is someone else's code: the page must outlive its bugs
            log.exception("dashboard_summary_failed")
            return
        self._frame = sse_frame("summary", data)
        self._frame_time = time.monotonic()
        self._sequence += 1
        self._wake()

    async def run(self) -> None:
        """Publish every interval until `close()`; run it as a task."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._closed:
            due += self._interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            if self._closed:
                break
            if loop.time() > due + self._interval:  # the loop stalled: skip, don't burst
                due = loop.time()
            if self._subscribers:
                self.publish()

    def subscribe(self) -> int:
        """Count a new event stream in; returns the sequence to pass to `next_frame` first."""
        self._subscribers += 1
        if time.monotonic() - self._frame_time > 2 * self._interval:
            self.publish()  # nobody was listening, or the source fails: start from fresh data
        return 0

    def unsubscribe(self) -> None:
        """Count an event stream out."""
        self._subscribers -= 1

    async def next_frame(self, seen: int) -> tuple[int, bytes] | None:
        """The latest frame newer than sequence `seen`, waiting for one; None once closed."""
        while not self._closed:
            if self._frame is not None and self._sequence > seen:
                return self._sequence, self._frame
            await self._changed.wait()
        return None

    def close(self) -> None:
        """End `run()` and every `next_frame()` wait."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
