"""Download receipts (DOWNLOAD RECEIPTS in the proto): a learner announcing "receipt"
acknowledges model chunks, and the controller keeps only a window of them unacknowledged, so the
send budget bounds the model bytes on their way to learners wherever they wait."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from metis_async.budget import RECEIPT_WINDOW_CHUNKS
from metis_async.client import RunSummary
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearners, sync_policy

Factory = Callable[..., ControllerThread]
RECEIPT = ["train", "delta", "receipt"]
PARAMS = 10_000  # 40,000 bytes: 40 chunks of 1 KiB
CHUNKS = 40
SMALL_CHUNKS = {"download_chunk_bytes": 1024, "download_receipt_bytes": 0}


class Reader:
    """Reads a raw learner's stream in a thread, so a test can wait for a message with a
    timeout (and see that none comes)."""

    def __init__(self, raw: RawLearner) -> None:
        self.messages: queue.Queue[pb.ControllerMessage | BaseException] = queue.Queue()
        threading.Thread(target=self._read, args=(raw,), daemon=True).start()

    def _read(self, raw: RawLearner) -> None:
        try:
            for data in raw.responses:
                self.messages.put(pb.ControllerMessage.FromString(data))
        except grpc.RpcError as error:
            self.messages.put(error)

    def next(self, timeout: float = 10.0) -> pb.ControllerMessage:
        item = self.messages.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def until(self, kind: str) -> pb.ControllerMessage:
        while (message := self.next()).WhichOneof("body") != kind:
            pass
        return message

    def quiet_for(self, seconds: float) -> bool:
        """Whether no message at all arrives within `seconds`."""
        try:
            self.messages.put(self.messages.get(timeout=seconds))  # put back: order kept
        except queue.Empty:
            return True
        return False


def _read_to_the_end(reader: Reader) -> None:
    while True:
        reader.next()


def _receipt(version: int, chunks: int) -> pb.LearnerMessage:
    return pb.LearnerMessage(received=pb.ModelReceived(version=version, chunks=chunks))


def _model() -> list[np.ndarray]:
    return [np.zeros(PARAMS, dtype=np.float32)]


def test_chunks_stop_at_the_window_until_the_learner_acknowledges(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), _model(), **SMALL_CHUNKS)
    raw = RawLearner(ct.address, "a", capabilities=RECEIPT)
    reader = Reader(raw)
    header = reader.until("model").model
    first = [reader.next().chunk for _ in range(RECEIPT_WINDOW_CHUNKS)]

    held_at_window = reader.quiet_for(0.5)
    raw.send(_receipt(header.version, RECEIPT_WINDOW_CHUNKS))
    rest = []
    for _ in range(CHUNKS - RECEIPT_WINDOW_CHUNKS):
        rest.append(reader.next().chunk)
        raw.send(_receipt(header.version, RECEIPT_WINDOW_CHUNKS + len(rest)))
    task = reader.until("train").train

    assert header.receipt
    assert header.payload.num_chunks == CHUNKS
    assert held_at_window
    assert [c.index for c in first + rest] == list(range(CHUNKS))
    assert task.model_version == header.version
    raw.close()


def test_learners_without_the_capability_get_the_whole_model_unasked(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), _model(), **SMALL_CHUNKS)
    raw = RawLearner(ct.address, "plain", capabilities=["train", "delta"])

    header = raw.until("model").model
    indexes = [raw.next().chunk.index for _ in range(CHUNKS)]

    assert not header.receipt
    assert indexes == list(range(CHUNKS))
    assert raw.until("train").train.model_version == header.version
    raw.close()


def test_models_below_the_threshold_ask_for_no_receipts(controller_factory: Factory) -> None:
    ct = controller_factory(  # 40 KB < the 1 MiB default threshold
        sync_policy(min_learners=1, rounds=1), _model(), download_chunk_bytes=1024
    )
    raw = RawLearner(ct.address, "small", capabilities=RECEIPT)

    assert not raw.until("model").model.receipt
    raw.close()


def test_a_learner_that_never_acknowledges_is_dropped_and_frees_the_send_budget(
    controller_factory: Factory,
) -> None:
    # The budget holds about 8 chunks: the silent learner takes all of it, then waits.
    ct = controller_factory(
        sync_policy(min_learners=1, rounds=1),
        _model(),
        download_buffer_bytes=8 * 1024,
        heartbeat_interval_seconds=0.2,
        heartbeat_timeout_seconds=1.5,
        **SMALL_CHUNKS,
    )
    beating = threading.Event()

    def heartbeats(raw: RawLearner) -> None:  # alive, whatever else it does
        while not beating.wait(0.2):
            raw.send(pb.LearnerMessage(heartbeat=pb.Heartbeat()))

    silent = RawLearner(ct.address, "silent", capabilities=RECEIPT)
    silent_reader = Reader(silent)
    silent_reader.until("model")
    polite = RawLearner(ct.address, "polite", capabilities=RECEIPT)
    polite_reader = Reader(polite)
    for raw in (silent, polite):
        threading.Thread(target=heartbeats, args=(raw,), daemon=True).start()
    header = polite_reader.until("model").model
    started = time.monotonic()
    starved = polite_reader.quiet_for(0.5)  # the silent learner holds the whole budget
    for received in range(1, CHUNKS + 1):
        polite_reader.next()
        polite.send(_receipt(header.version, received))
    waited = time.monotonic() - started
    with pytest.raises(grpc.RpcError) as ended:
        _read_to_the_end(silent_reader)
    beating.set()

    assert starved
    assert waited >= 1.0  # until the silent learner was dropped
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unacknowledged" in (ended.value.details() or "")
    assert polite_reader.until("train").train.model_version == header.version
    silent.close()
    polite.close()


def test_the_client_acknowledges_downloads_and_trains(controller_factory: Factory) -> None:
    # Small chunks and a budget of a few of them: a client that did not acknowledge would
    # stall at the window and be dropped.
    ct = controller_factory(
        sync_policy(min_learners=2, rounds=3),
        _model(),
        download_buffer_bytes=8 * 1024,
        **SMALL_CHUNKS,
    )

    learners = ShiftLearners(ct.address, {"x": 1.0, "y": 3.0}, size=PARAMS)

    assert ct.wait_finished(30)
    np.testing.assert_allclose(ct.model(), np.full(PARAMS, 6.0, np.float32))  # 3 rounds of +2
    out = learners.join()
    assert all(isinstance(o, RunSummary) for o in out)
    assert all(o.sessions == 1 for o in out)  # never dropped
