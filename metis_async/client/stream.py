"""One learner session's shared state: the outbox feeding the request stream, and what arrived.

The reader thread, the task worker and the heartbeat thread all send through `LearnerStream.send`;
once the stream is closed, sends are dropped, so late results of a dead session go nowhere.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

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
        self.send(pb.LearnerMessage(hello=hello))

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
