"""The learner client against a scripted controller that sends exactly what each case needs.

Each test runs the real `run_learner` against a real gRPC server on 127.0.0.1 (port 0) whose
streams follow a list of scripts, one per connection: the n-th stream the learner opens is served
by the n-th script. Scripts record what the learner sent; the assertions read those records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from metis_async import wire
from metis_async.client import (
    Backoff,
    EvaluateConfig,
    FitConfig,
    Learner,
    NDArrays,
    RunSummary,
    run_learner,
)
from metis_async.client import runner as client_runner
from metis_async.v1 import controller_pb2 as pb

pytestmark = pytest.mark.timeout(30)

MiB = 1024 * 1024
FAST = Backoff(initial_seconds=0.01, max_seconds=0.05, max_attempts=3)
Messages = Iterator[pb.ControllerMessage]


class Conversation:
    """One learner stream as the scripted controller sees it."""

    def __init__(self, requests: Iterator[pb.LearnerMessage]) -> None:
        self.started_at = time.monotonic()
        self._requests = requests
        self.received: list[pb.LearnerMessage] = []
        self.hello = self.receive("hello").hello
        self.upload: np.ndarray | None = None
        self.upload_chunks = 0
        self.shutdown_sent_at = 0.0

    def receive(self, kind: str) -> pb.LearnerMessage:
        """Read learner messages until one of `kind` arrives."""
        for message in self._requests:
            self.received.append(message)
            if message.WhichOneof("body") == kind:
                return message
        raise AssertionError(f"stream ended before a {kind} arrived")

    def receive_upload(self, layout: pb.ModelLayout, max_chunk_bytes: int) -> pb.TaskResult:
        """Read a train result and its chunks; keep the reassembled vector in `upload`."""
        result = self.receive("result").result
        assembler = wire.PayloadAssembler(
            result.payload, int(layout.total_bytes), layout.layout_id, max_chunk_bytes
        )
        while not assembler.done:
            assembler.add(self.receive("chunk").chunk)
            self.upload_chunks += 1
        self.upload = assembler.result().copy()
        return result

    def drain(self) -> None:
        """Read until the learner closes its side of the stream."""
        for message in self._requests:
            self.received.append(message)

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("body")) for m in self.received]


Script = Callable[[Conversation], Messages]


class ScriptedController:
    """A gRPC server whose n-th `Join` stream is served by `scripts[n]`."""

    def __init__(self, scripts: list[Script], max_message_bytes: int = 5 * MiB) -> None:
        self.scripts = scripts
        self.conversations: list[Conversation] = []
        self._lock = threading.Lock()
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=4),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self._join,
            request_deserializer=pb.LearnerMessage.FromString,
            response_serializer=pb.ControllerMessage.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("metis_async.v1.Controller", {"Join": handler}),)
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _join(
        self, requests: Iterator[pb.LearnerMessage], context: grpc.ServicerContext
    ) -> Messages:
        conversation = Conversation(requests)
        with self._lock:
            index = len(self.conversations)
            self.conversations.append(conversation)
        if index >= len(self.scripts):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"no script for stream {index}")
        yield from self.scripts[index](conversation)


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedController]]:
    made: list[ScriptedController] = []

    def make(*scripts: Script, max_message_bytes: int = 5 * MiB) -> ScriptedController:
        controller = ScriptedController(list(scripts), max_message_bytes)
        made.append(controller)
        return controller

    yield make
    for controller in made:
        controller.server.stop(0)


class RecordingLearner(Learner):
    """Adds `shift` to every parameter and records the final-model hook."""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = shift
        self.finished: list[tuple[NDArrays, int]] = []

    def get_parameters(self) -> NDArrays:
        return [np.zeros(4, dtype=np.float32)]

    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> tuple[NDArrays, int, dict[str, float]]:
        return [p + np.float32(self.shift) for p in parameters], 10, {"loss": 0.0}

    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> tuple[float, int, dict[str, float]]:
        return 0.0, 10, {}

    def on_federation_finished(self, parameters: NDArrays, version: int) -> None:
        self.finished.append((parameters, version))


# ---------------------------------------------------------------------------------- messages


def welcome(conversation: Conversation, **fields: object) -> pb.ControllerMessage:
    fields.setdefault("learner_id", conversation.hello.learner_id or "assigned-1")
    fields.setdefault("session_id", f"s{time.monotonic_ns()}")
    fields.setdefault("heartbeat_interval_seconds", 5.0)
    fields.setdefault("max_chunk_bytes", wire.MAX_CHUNK_BYTES)
    return pb.ControllerMessage(welcome=pb.Welcome(**fields))  # type: ignore[arg-type]


def model(
    version: int, flat: np.ndarray, layout: pb.ModelLayout, chunk_bytes: int = wire.MAX_CHUNK_BYTES
) -> list[pb.ControllerMessage]:
    header, chunks = wire.make_payload(
        flat, version + 1, pb.PAYLOAD_KIND_WEIGHTS, layout.layout_id, chunk_bytes
    )
    head = pb.ControllerMessage(model=pb.Model(version=version, payload=header))
    return [head, *(pb.ControllerMessage(chunk=c) for c in chunks)]


def train(task_id: str, version: int) -> pb.ControllerMessage:
    config = pb.TrainConfig(local_steps=1, batch_size=8)
    return pb.ControllerMessage(
        train=pb.TrainTask(task_id=task_id, model_version=version, config=config)
    )


def finished(reason: str = "done", final_version: int = 0) -> pb.ControllerMessage:
    kind = pb.SHUTDOWN_KIND_FINISHED
    return pb.ControllerMessage(
        shutdown=pb.Shutdown(reason=reason, final_version=final_version, kind=kind)
    )


def draining(retry_after_seconds: float = 0.0) -> pb.ControllerMessage:
    shutdown = pb.Shutdown(
        reason="restarting", kind=pb.SHUTDOWN_KIND_DRAINING, retry_after_seconds=retry_after_seconds
    )
    return pb.ControllerMessage(shutdown=shutdown)


def layout_message(layout: pb.ModelLayout) -> pb.ControllerMessage:
    return pb.ControllerMessage(layout=layout)


ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.linspace(0, 1, 4)]  # float32, float64
LAYOUT = wire.make_layout(ARRAYS)
FLAT = wire.flatten(ARRAYS, LAYOUT)


def run(controller: ScriptedController, learner: Learner | None = None, **kw: object) -> RunSummary:
    return run_learner(controller.address, learner or RecordingLearner(), backoff=FAST, **kw)  # type: ignore[arg-type]


def just_finish(conversation: Conversation) -> Messages:
    yield welcome(conversation)
    yield finished()


# ---------------------------------------------------------------------------------- chunk sizes


def test_eight_mib_chunks_are_downloaded_trained_and_uploaded(scripted) -> None:
    big = [np.arange(3 * MiB, dtype=np.float32)]  # 12 MiB: two 8 MiB chunks
    layout = wire.make_layout(big)

    def script(c: Conversation) -> Messages:
        yield welcome(c, max_chunk_bytes=8 * MiB, run_id="r")
        yield layout_message(layout)
        yield from model(0, wire.flatten(big, layout), layout, chunk_bytes=8 * MiB)
        yield train("t1", 0)
        c.receive_upload(layout, 8 * MiB)
        yield finished()

    controller = scripted(script, max_message_bytes=9 * MiB)

    summary = run(controller)

    assert summary.tasks_completed == 1
    conversation = controller.conversations[0]
    assert conversation.upload_chunks == 2
    np.testing.assert_array_equal(conversation.upload, big[0] + 1)


def test_larger_announced_chunks_reconnect_once_with_a_larger_channel(
    scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_runner, "CHANNEL_CHUNK_BYTES", 1 * MiB)  # 2 MiB with framing
    values = [np.ones(768 * 1024, dtype=np.float32)]  # 3 MiB in one chunk
    layout = wire.make_layout(values)

    def first(c: Conversation) -> Messages:
        yield welcome(c, max_chunk_bytes=4 * MiB)

    def second(c: Conversation) -> Messages:
        yield welcome(c, max_chunk_bytes=4 * MiB, run_id="r")
        yield layout_message(layout)
        yield from model(0, wire.flatten(values, layout), layout, chunk_bytes=4 * MiB)
        yield finished(final_version=0)

    controller = scripted(first, second)

    summary = run(controller)

    assert len(controller.conversations) == 2
    assert summary.errors == []
    assert summary.final_parameters is not None
    np.testing.assert_array_equal(summary.final_parameters[0], values[0])


# ---------------------------------------------------------------------------------- bad models


def _bad_size(c: Conversation) -> Messages:
    header, _ = wire.make_payload(FLAT, 1, pb.PAYLOAD_KIND_WEIGHTS, LAYOUT.layout_id)
    header.total_bytes += 4
    yield pb.ControllerMessage(model=pb.Model(version=0, payload=header))


def _chunk_without_model(c: Conversation) -> Messages:
    yield pb.ControllerMessage(chunk=pb.Chunk(payload_id=9, index=0, data=b"\0" * 8))


def _other_layout(c: Conversation) -> Messages:
    header, _ = wire.make_payload(FLAT, 1, pb.PAYLOAD_KIND_WEIGHTS, LAYOUT.layout_id + 1)
    yield pb.ControllerMessage(model=pb.Model(version=0, payload=header))


def _chunk_out_of_order(c: Conversation) -> Messages:
    messages = model(0, FLAT, LAYOUT, chunk_bytes=16)
    yield messages[0]
    yield messages[2]


MALFORMED = [_bad_size, _chunk_without_model, _other_layout, _chunk_out_of_order]


def _malformed_then_finish(bad: Callable[[Conversation], Messages]) -> list[Script]:
    def first(c: Conversation) -> Messages:
        yield welcome(c, learner_id="assigned-7")
        yield layout_message(LAYOUT)
        yield from bad(c)
        c.drain()  # the learner closes its side

    return [first, just_finish]


@pytest.mark.parametrize("bad", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_malformed_model_makes_the_learner_reconnect_with_its_id(scripted, bad) -> None:
    controller = scripted(*_malformed_then_finish(bad))

    summary = run(controller)

    assert [c.hello.learner_id for c in controller.conversations] == ["", "assigned-7"]
    assert summary.shutdown_reason == "done"
    assert any(e.startswith("WireError") for e in summary.errors)


def test_learner_says_why_before_closing_on_a_malformed_model(scripted) -> None:
    controller = scripted(*_malformed_then_finish(_bad_size))

    run(controller)

    first = controller.conversations[0]
    errors = [m.error for m in first.received if m.WhichOneof("body") == "error"]
    assert [e.code for e in errors] == [pb.ERROR_CODE_INVALID_ARGUMENT]
    assert "bytes" in errors[0].message


# ---------------------------------------------------------------------------------- shutdown kinds


def test_draining_reconnects_after_retry_after_then_finished_ends_the_run(scripted) -> None:
    def first(c: Conversation) -> Messages:
        yield welcome(c)
        c.shutdown_sent_at = time.monotonic()
        yield draining(retry_after_seconds=0.3)

    controller = scripted(first, just_finish)

    summary = run(controller)

    first_stream, second_stream = controller.conversations
    assert second_stream.started_at - first_stream.shutdown_sent_at >= 0.3
    assert second_stream.hello.learner_id == "assigned-1"
    assert summary.shutdown_reason == "done"
    assert summary.sessions == 2


def test_unspecified_shutdown_kind_ends_the_run(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c)
        yield pb.ControllerMessage(shutdown=pb.Shutdown(reason="controller stopping"))

    controller = scripted(script)

    summary = run(controller)

    assert len(controller.conversations) == 1
    assert summary.shutdown_reason == "controller stopping"


# ---------------------------------------------------------------------------------- final model


def test_final_model_before_finished_is_in_the_summary_and_the_hook(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, run_id="r")
        yield layout_message(LAYOUT)
        yield from model(3, FLAT, LAYOUT)
        yield finished(final_version=3)

    controller = scripted(script)
    learner = RecordingLearner()

    summary = run(controller, learner)

    assert summary.final_version == 3
    assert summary.final_parameters is not None
    for got, want in zip(summary.final_parameters, ARRAYS, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=0)
    [(hooked, version)] = learner.finished
    assert version == 3
    for got, want in zip(hooked, summary.final_parameters, strict=True):
        np.testing.assert_array_equal(got, want)


def test_no_final_model_means_no_hook(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, run_id="r")
        yield layout_message(LAYOUT)
        yield from model(2, FLAT, LAYOUT)
        yield finished(final_version=3)  # version 3 never sent

    learner = RecordingLearner()

    summary = run(scripted(script), learner)

    assert summary.final_parameters is None
    assert summary.final_version is None
    assert learner.finished == []


# ---------------------------------------------------------------------------------- held model


def _deliver_v5_then_drain(c: Conversation) -> Messages:
    yield welcome(c, run_id="run-A")
    yield layout_message(LAYOUT)
    yield from model(5, FLAT, LAYOUT)
    yield draining()


def test_hello_after_reconnect_announces_the_held_model(scripted) -> None:
    controller = scripted(_deliver_v5_then_drain, just_finish)

    run(controller)

    first, second = (c.hello for c in controller.conversations)
    assert not first.holds_model
    assert second.holds_model
    assert second.held_version == 5
    assert second.held_run_id == "run-A"
    assert second.held_layout_id == LAYOUT.layout_id


def test_held_model_serves_a_task_without_a_resend(scripted) -> None:
    def second(c: Conversation) -> Messages:
        yield welcome(c, run_id="run-A")
        yield layout_message(LAYOUT)
        yield train("t1", 5)
        c.receive_upload(LAYOUT, wire.MAX_CHUNK_BYTES)
        yield finished()

    controller = scripted(_deliver_v5_then_drain, second)

    summary = run(controller)

    assert summary.tasks_completed == 1
    np.testing.assert_array_equal(controller.conversations[1].upload, FLAT + 1)


def test_held_model_of_another_run_is_not_trained_on(scripted) -> None:
    def second(c: Conversation) -> Messages:
        yield welcome(c, run_id="run-B")  # the controller restarted without a checkpoint
        yield layout_message(LAYOUT)
        yield train("t1", 5)
        c.receive("error")
        yield finished()

    controller = scripted(_deliver_v5_then_drain, second)

    summary = run(controller)

    assert summary.tasks_completed == 0
    assert summary.tasks_failed == 1


def test_model_without_a_run_id_is_not_announced(scripted) -> None:
    def first(c: Conversation) -> Messages:
        yield welcome(c)  # an older controller: no run id
        yield layout_message(LAYOUT)
        yield from model(5, FLAT, LAYOUT)
        yield draining()

    controller = scripted(first, just_finish)

    run(controller)

    assert not controller.conversations[1].hello.holds_model


# ---------------------------------------------------------------------------------- hello, status


def test_capabilities_are_announced(scripted) -> None:
    controller = scripted(just_finish)

    run(controller)

    capabilities = set(controller.conversations[0].hello.capabilities)
    assert capabilities == {
        "train",
        "evaluate",
        "delta",
        "final_model",
        "bundle",
        "ack",
        "grant",
        "receipt",
        "secagg",  # "he" only with keys
    }


def test_status_messages_are_logged(scripted, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="metis_async.client")

    def script(c: Conversation) -> Messages:
        yield welcome(c)
        status = pb.Status(
            state=pb.FEDERATION_STATE_WAITING_FOR_LEARNERS, learners_connected=2, learners_needed=3
        )
        yield pb.ControllerMessage(status=status)
        yield finished()

    run(scripted(script))

    assert "federation_status state=waiting_for_learners connected=2 needed=3" in caplog.text


# ---------------------------------------------------------------------------------- initial model


def _receive_initial_model(c: Conversation, max_chunk_bytes: int) -> None:
    layout = c.receive("layout").layout
    header = c.receive("initial_model").initial_model.payload
    assembler = wire.PayloadAssembler(
        header, int(layout.total_bytes), layout.layout_id, max_chunk_bytes
    )
    while not assembler.done:
        assembler.add(c.receive("chunk").chunk)
        c.upload_chunks += 1
    c.upload = assembler.result().copy()


def test_welcome_asking_for_the_initial_model_gets_it_in_announced_chunks(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, need_initial_model=True, max_chunk_bytes=4)
        _receive_initial_model(c, max_chunk_bytes=4)
        yield finished()

    controller = scripted(script)

    run(controller)

    conversation = controller.conversations[0]
    assert conversation.upload_chunks == 4  # 16 bytes in chunks of 4
    np.testing.assert_array_equal(conversation.upload, np.zeros(4, np.float32))


def test_status_asking_a_waiting_learner_for_the_initial_model_gets_it(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c)
        status = pb.Status(state=pb.FEDERATION_STATE_WAITING_FOR_MODEL, need_initial_model=True)
        yield pb.ControllerMessage(status=status)
        _receive_initial_model(c, wire.MAX_CHUNK_BYTES)
        yield finished()

    controller = scripted(script)

    run(controller)

    np.testing.assert_array_equal(controller.conversations[0].upload, np.zeros(4, np.float32))


class NoModelLearner(RecordingLearner):
    def get_parameters(self) -> NDArrays:
        raise RuntimeError("no local model yet")


def test_learner_that_cannot_provide_a_model_says_so_and_stays(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, need_initial_model=True)
        c.receive("error")
        yield finished()

    controller = scripted(script)

    summary = run(controller, NoModelLearner())

    [error] = [m.error for m in controller.conversations[0].received if m.HasField("error")]
    assert error.task_id == ""
    assert "no local model yet" in error.message
    assert summary.shutdown_reason == "done"


# ---------------------------------------------------------------------------------- bundles


def _bundle(*messages: pb.ControllerMessage) -> pb.ControllerMessage:
    raw = [m.SerializeToString() for m in messages]
    return pb.ControllerMessage(bundle=pb.Bundle(messages=raw))


def test_a_bundled_model_and_task_are_trained_like_separate_messages(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, run_id="r")
        yield _bundle(layout_message(LAYOUT), *model(0, FLAT, LAYOUT), train("t1", 0))
        c.receive_upload(LAYOUT, wire.MAX_CHUNK_BYTES)
        yield finished()

    controller = scripted(script)

    summary = run(controller, RecordingLearner(shift=1.0))

    assert summary.tasks_completed == 1
    np.testing.assert_allclose(controller.conversations[0].upload, FLAT + 1)


def test_a_nested_bundle_breaks_the_contract(scripted) -> None:
    def nested(c: Conversation) -> Messages:
        yield _bundle(_bundle(train("t1", 0)))

    controller = scripted(*_malformed_then_finish(nested))

    summary = run(controller)

    assert summary.shutdown_reason == "done"
    assert any("bundle carried bundle" in e for e in summary.errors)


# ---------------------------------------------------------------------------------- upload grants


def _train_on_grant(task_id: str, version: int) -> pb.ControllerMessage:
    message = train(task_id, version)
    message.train.upload_grant = True
    return message


def _task_on_grant_until_its_result(c: Conversation) -> Messages:
    yield welcome(c, run_id="r")
    yield layout_message(LAYOUT)
    yield from model(0, FLAT, LAYOUT)
    yield _train_on_grant("t1", 0)
    c.receive("result")


def test_chunks_of_a_task_asking_for_a_grant_follow_the_grant(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield from _task_on_grant_until_its_result(c)
        yield pb.ControllerMessage(grant=pb.UploadGrant(task_id="t1"))
        while c.upload_chunks < 1:
            c.receive("chunk")
            c.upload_chunks += 1
        yield finished()

    controller = scripted(script)

    summary = run(controller)

    assert summary.tasks_completed == 1
    assert controller.conversations[0].upload_chunks == 1


def test_a_refused_grant_means_no_chunks_are_sent(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield from _task_on_grant_until_its_result(c)
        stale = pb.Error(code=pb.ERROR_CODE_STALE_TASK, message="closed", task_id="t1")
        yield pb.ControllerMessage(error=stale)
        yield finished()
        c.drain()

    controller = scripted(script)

    run(controller)

    assert "chunk" not in controller.conversations[0].kinds()


# ------------------------------------------------------------------------------ download receipts


def test_each_chunk_of_a_model_asking_for_receipts_is_acknowledged(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, run_id="r")
        yield layout_message(LAYOUT)
        head, *chunks = model(0, FLAT, LAYOUT, chunk_bytes=16)  # 40 bytes: 3 chunks
        head.model.receipt = True
        yield head
        for chunk in chunks:
            yield chunk
            c.receive("received")
        yield finished()
        c.drain()

    controller = scripted(script)

    run(controller)

    receipts = [m.received for m in controller.conversations[0].received if m.HasField("received")]
    assert [(r.version, r.chunks) for r in receipts] == [(0, 1), (0, 2), (0, 3)]


def test_a_model_without_the_receipt_flag_is_not_acknowledged(scripted) -> None:
    def script(c: Conversation) -> Messages:
        yield welcome(c, run_id="r")
        yield layout_message(LAYOUT)
        yield from model(0, FLAT, LAYOUT, chunk_bytes=16)
        yield finished()
        c.drain()

    controller = scripted(script)

    run(controller)

    assert "received" not in controller.conversations[0].kinds()
