"""One learner session's shared state: the outbox feeding the request stream, and what arrived.

The reader thread, the task worker and the heartbeat thread all send through `LearnerStream.send`;
once the stream is closed, sends are dropped, so late results of a dead session go nowhere.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout

from metis_async.client.masking import SecAggParty
from metis_async.client.models import ModelReceiver
from metis_async.v1 import controller_pb2 as pb


class LearnerStream:
    """State of one `Join` stream on the learner side.

    Args:
        hello: the first message, queued at once.
        models: the downloads of this session (starts with the held model, if any).
    """

    def __init__(self, hello: pb.Hello, models: ModelReceiver) -> None:
        self.outbox: queue.SimpleQueue[pb.LearnerMessage | None] = queue.SimpleQueue()
        self.closed = threading.Event()
        self.models = models
        self.welcomed = False
        self.sent_initial_model = False
        self.cancelled: set[str] = set()  # task ids the controller cancelled
        self.heartbeat_seconds = 5.0
        self._grants: dict[str, Future[bool]] = {}  # task id -> granted (True) or refused
        self._receipt: list[int] | None = None  # [version, chunks received] of a receipt model
        self.secagg = SecAggParty()  # this stream's SecAgg+ round, if the controller runs them
        self.masked = False  # Welcome.secagg: uploads are masked
        self.send(pb.LearnerMessage(hello=hello))

    def model_announced(self, model: pb.Model) -> None:
        """A model header arrived: acknowledge its chunks if it asks (DOWNLOAD RECEIPTS)."""
        self._receipt = [int(model.version), 0] if model.receipt else None

    def chunk_received(self, complete: bool) -> None:
        """A chunk of the announced model arrived (`complete`: it was the last one); a receipt
        model's chunks are acknowledged one by one, at once (the controller's window of sent
        chunks only moves on receipts, so an acknowledgement held back for a later chunk could
        wait forever)."""
        receipt = self._receipt
        if receipt is None:
            return
        receipt[1] += 1
        received = pb.ModelReceived(version=receipt[0], chunks=receipt[1])
        self.send(pb.LearnerMessage(received=received))
        if complete:
            self._receipt = None

    def expect_grant(self, task_id: str) -> None:
        """Note, before its TaskResult is sent, that `task_id`'s chunks wait for a grant."""
        self._grants[task_id] = Future()

    def answer_grant(self, task_id: str, granted: bool) -> None:
        """The controller granted (or refused: STALE_TASK, DUPLICATE, Ack) `task_id`'s upload."""
        answer = self._grants.get(task_id)
        if answer is not None:
            with contextlib.suppress(InvalidStateError):  # answered already
                answer.set_result(granted)

    def wait_for_grant(self, task_id: str) -> bool:
        """Block until `task_id`'s upload is granted (True) or refused, or the stream closed."""
        answer = self._grants.get(task_id)
        if answer is None:
            return True
        try:
            while not self.closed.is_set():
                with contextlib.suppress(FutureTimeout):
                    return answer.result(timeout=0.25) and not self.closed.is_set()
            return False
        finally:
            self._grants.pop(task_id, None)

    def send(self, message: pb.LearnerMessage) -> None:
        """Queue a message for the controller (dropped once the stream is closed)."""
        if not self.closed.is_set():
            self.outbox.put(message)

    def close(self) -> None:
        """End the request stream (a half-close: the controller sees end-of-stream)."""
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(None)

    def requests(self) -> Iterator[pb.LearnerMessage]:
        """The request iterator handed to gRPC; ends when the stream is closed."""
        while (message := self.outbox.get()) is not None:
            yield message
