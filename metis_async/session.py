"""One learner's stream: transport state only.

A `Session` lives exactly as long as one `Join` stream and holds nothing the federation needs to
remember: its identity on the wire, liveness, the bounded send queue, the upload being
reassembled and what this stream has already been sent (the layout). Tasks, held versions,
closed-task memory and participation live in the federation core, by learner id, and survive
reconnects. Sends never block the caller: messages (already serialized, often shared by many
sessions) go into a bounded queue drained by the stream's writer; a learner too slow to drain it
is disconnected rather than stalling the others.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from metis_async.budget import ReceiptLedger
from metis_async.protocols import Task
from metis_async.secure.aggregate import CipherUpload
from metis_async.store import ModelDownload
from metis_async.v1 import controller_pb2 as pb
from metis_async.wire import Upload


class BundleParts:
    """Consecutive small messages for one stream, joined into one `Bundle` message only when
    the stream writes it (`delivery.bundle_message`, within `ControllerConfig.bundle_buffer_bytes`).

    A broadcast queues a small model's chunk and the round's task, the same objects for every
    stream: joined at once per stream, N streams held N copies of the model until their
    writes; as parts, shared by every stream of a broadcast, the bundle is joined once
    (`joined`), and only the writes in flight (gRPC copies what it is given) hold copies.

    Args:
        messages: serialized `ControllerMessage`s, in order.
    """

    __slots__ = ("joined", "messages", "nbytes")

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.nbytes = sum(len(message) + 11 for message in messages) + 11  # tags, lengths
        self.joined: bytes | None = None
        """The bundle, joined once for every stream queued these parts (a broadcast)."""


Outgoing = bytes | ModelDownload | BundleParts
"""What a stream's queue holds: one serialized `ControllerMessage`, a run of them to bundle,
or a model's messages."""


class SendQueue:
    """A stream's bounded outbox: many senders (never blocking), one reader (its writer).

    asyncio.Queue with an Event for closing took ~3.5 KB a session in deques and waiter lists;
    with 100,000 streams that is 350 MB. This holds one deque, made on first use, and nothing
    else: the reader is a writer task started when the queue fills (`Session.send`), which ends
    when it is empty again, so nothing waits on an idle stream.

    Args:
        maxsize: messages it holds; `put_nowait` raises `asyncio.QueueFull` beyond.
    """

    __slots__ = ("_items", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[Outgoing | None] | None = None

    def put_nowait(self, item: Outgoing | None) -> None:
        """Queue `item` (None: the end of the stream); asyncio.QueueFull when full."""
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        if len(items) >= self.maxsize:
            raise asyncio.QueueFull
        items.append(item)

    def pop(self) -> Outgoing | Empty | None:
        """The next item, or `EMPTY` when there is none."""
        items = self._items
        if not items:
            return EMPTY
        item = items.popleft()
        if not items:
            self._items = None  # an idle stream keeps no deque (~760 bytes each)
        return item

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items) if self._items else 0


class Empty(enum.Enum):
    """`SendQueue.pop` found nothing to write."""

    EMPTY = enum.auto()


EMPTY = Empty.EMPTY


class _Flag:
    """`is_set()` / `set()` without an asyncio.Event's waiter list (nobody waits on it)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True


def controller_message(**body: Any) -> bytes:
    """Serialize a `ControllerMessage` with one body field, e.g. `controller_message(cancel=c)`."""
    return pb.ControllerMessage(**body).SerializeToString()


class ProtocolViolation(Exception):
    """A learner broke the wire contract; its stream ends with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class PendingUpload:
    """A train result whose payload chunks are still arriving."""

    task: Task
    result: pb.TaskResult
    upload: Upload | CipherUpload


class Session:
    """Transport state of one learner stream.

    Args:
        learner_id: the learner's stable identity.
        session_id: unique id of this stream.
        now: loop time of creation (seconds).
        queue_limit: most messages waiting to be written before the learner is dropped.
        capabilities: what the learner announced in its hello.
        peer: the peer address gRPC reports.
    """

    __slots__ = (
        "asked_for_model",
        "capabilities",
        "close_code",
        "close_message",
        "closing",
        "discard_chunks",
        "discard_payload_id",
        "download_dtype",
        "grant_tasks",
        "has_layout",
        "holds_slot",
        "initial_layout",
        "initial_upload",
        "last_seen",
        "learner_id",
        "ledger",
        "model_sent",
        "on_close",
        "peer",
        "pending",
        "queue",
        "session_id",
        "staged",
        "takes_bundles",
        "upload_dtype",
        "waiting_for_slot",
        "wake_writer",
        "writer",
        "writing",
    )

    def __init__(
        self,
        learner_id: str,
        session_id: str,
        now: float,
        queue_limit: int,
        capabilities: frozenset[str] = frozenset(),
        peer: str = "",
    ) -> None:
        self.learner_id = learner_id
        self.session_id = session_id
        self.capabilities = capabilities
        self.peer = peer
        self.last_seen = now
        self.has_layout = False
        self.model_sent = -1  # the version last queued on this stream (-1: none)
        self.takes_bundles = "bundle" in capabilities
        self.staged: list[Outgoing] = []  # messages of one effect list, bundled when it ends
        self.upload_dtype: int = pb.DTYPE_FLOAT32  # negotiated at hello (Welcome)
        self.download_dtype: int = pb.DTYPE_FLOAT32
        self.asked_for_model = False  # this stream was asked for the initial model
        self.initial_layout: pb.ModelLayout | None = None
        self.initial_upload: Upload | None = None
        self.pending: PendingUpload | None = None
        self.waiting_for_slot = False  # its result waits for an upload slot (stream not read)
        self.holds_slot = False
        self.discard_chunks = 0  # chunks of a stale result still to skip
        # train tasks sent with upload_grant, not yet answered (made on first use)
        self.grant_tasks: set[str] | None = None
        self.discard_payload_id = 0
        self.queue = SendQueue(queue_limit)
        self.writing = False  # a message is being handed to gRPC
        # The task writing the queue, while it has something to write (None when idle), and
        # what starts one (set by the server once the stream may be written; None before).
        self.writer: asyncio.Task[None] | None = None
        self.wake_writer: Callable[[], None] | None = None
        # Model chunks awaiting the learner's receipt ("receipt" learners; set by the server).
        self.ledger: ReceiptLedger | None = None
        self.closing = _Flag()  # set by close(); on_close wakes the stream's handler
        self.close_code: grpc.StatusCode | None = None
        self.close_message = ""
        self.on_close: Callable[[], None] | None = None  # wakes the stream's handler

    def expect_grant(self, task_id: str) -> None:
        """Train task `task_id` went out with `upload_grant`: its result waits for a grant."""
        if self.grant_tasks is None:
            self.grant_tasks = set()
        self.grant_tasks.add(task_id)

    def take_grant(self, task_id: str) -> bool:
        """Whether the result of `task_id` waits for a grant (asked once: it is forgotten)."""
        tasks = self.grant_tasks
        if not tasks or task_id not in tasks:
            return False
        tasks.discard(task_id)
        if not tasks:
            self.grant_tasks = None  # an idle stream keeps no set (216 bytes each)
        return True

    def send(self, *messages: Outgoing) -> bool:
        """Queue serialized `ControllerMessage`s (or a model's); False (and the session
        closes) if full."""
        if self.closing.is_set():
            return False
        for message in messages:
            try:
                self.queue.put_nowait(message)
            except asyncio.QueueFull:
                self.close(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"send queue full ({self.queue.maxsize} messages): learner reads too slowly",
                )
                return False
        self._start_writing()
        return True

    def _start_writing(self) -> None:
        if self.writer is None and self.wake_writer is not None:
            self.wake_writer()

    def finish(self) -> None:
        """End the stream normally once everything queued so far has been written."""
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            self.close(None, "")
            return
        self._start_writing()

    def close(self, code: grpc.StatusCode | None, message: str) -> None:
        """End the stream now with a status (None: OK) without waiting for the queue."""
        if not self.closing.is_set():
            self.close_code = code
            self.close_message = message
            self.closing.set()
            if self.on_close is not None:
                self.on_close()

    def send_error(self, code: pb.ErrorCode.ValueType, message: str, task_id: str = "") -> None:
        """Tell the learner about a problem that does not end the stream."""
        error = pb.Error(code=code, message=message, task_id=task_id)
        self.send(controller_message(error=error))

    def describe(self) -> dict[str, object]:
        """A summary for logs and the dashboard."""
        return {
            "learner_id": self.learner_id,
            "session_id": self.session_id,
            "peer": self.peer,
            "capabilities": sorted(self.capabilities),
            "queued": self.queue.qsize(),
        }
