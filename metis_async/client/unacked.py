"""Training updates the controller has not acknowledged yet (exactly-once delivery).

A controller announces, with `Ack`, each update that is durably part of a committed version.
Until then the learner keeps the update's messages (the result header and its chunks) and,
after reconnecting to the same run, sends them again before anything else; the controller
counts an update at most once (see EXACTLY-ONCE UPDATES in controller.proto). Only the newest
`kept` updates are kept: each holds a copy of the model, and a learner is an edge device.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from metis_async.v1 import controller_pb2 as pb

log = logging.getLogger("metis_async.client")

UNACKED_KEPT = 4
"""Unacknowledged updates a learner keeps by default (the oldest is dropped beyond it)."""


@dataclass(frozen=True)
class _Kept:
    run_id: str
    result: pb.TaskResult
    chunks: tuple[pb.Chunk, ...]


class UnackedUpdates:
    """The updates sent but not acknowledged, oldest first (thread-safe).

    Args:
        kept: most updates kept (>= 1).
    """

    def __init__(self, kept: int = UNACKED_KEPT) -> None:
        if kept < 1:
            raise ValueError(f"kept must be >= 1, got {kept}")
        self._kept = kept
        self._updates: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._updates)

    def keep(self, run_id: str, result: pb.TaskResult, chunks: list[pb.Chunk]) -> None:
        """Remember an update just sent under run `run_id` (`Welcome.run_id`)."""
        if not run_id:
            return  # an older controller: it sends no acknowledgements
        with self._lock:
            self._updates[result.task_id] = _Kept(run_id, result, tuple(chunks))
            while len(self._updates) > self._kept:
                dropped, _ = self._updates.popitem(last=False)
                log.warning("unacked_update_dropped task_id=%s kept=%d", dropped, self._kept)

    def forget(self, task_id: str) -> bool:
        """The controller said it cannot use the update: it will never be counted."""
        with self._lock:
            return self._updates.pop(task_id, None) is not None

    def acknowledged(self, task_id: str) -> bool:
        """The controller acknowledged the update (`Ack`): it is durably counted."""
        return self.forget(task_id)

    def to_resend(
        self, run_id: str, upload_dtype: int
    ) -> list[tuple[pb.TaskResult, list[pb.Chunk]]]:
        """The updates to send again on a new session of run `run_id`, oldest first.

        Updates of another run are forgotten (that run's controller is gone), and so are those
        in a dtype the new session does not take (float32 is always taken).
        """
        with self._lock:
            for task_id, kept in list(self._updates.items()):
                dtype = kept.result.payload.dtype
                usable = dtype in (pb.DTYPE_FLOAT32, upload_dtype)
                if kept.run_id != run_id or not usable:
                    del self._updates[task_id]
            return [(k.result, list(k.chunks)) for k in self._updates.values()]
