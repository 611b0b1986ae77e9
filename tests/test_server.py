"""The controller over real gRPC on 127.0.0.1: federation, bad input, liveness, auth, reconnect."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from metis_async import wire
from metis_async.client import Backoff, LearnerStopped, RunSummary, run_learner
from metis_async.protocols import TrainSettings
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, run_in_threads, sync_policy

Factory = Callable[..., ControllerThread]
FAST = Backoff(initial_seconds=0.05, max_seconds=0.5, max_attempts=40)


def _start_learner(
    address: str, learner: ShiftLearner, learner_id: str, **kw: object
) -> tuple[threading.Thread, list[RunSummary | BaseException]]:
    out: list[RunSummary | BaseException] = []

    def run() -> None:
        try:
            out.append(
                run_learner(
                    address, learner, learner_id=learner_id, backoff=kw.pop("backoff", FAST), **kw
                )
            )  # type: ignore[arg-type]
        except BaseException as error:  # surfaced by the test
            out.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _train_task(raw: RawLearner) -> pb.TrainTask:
    return raw.until("train").train


def _delta_result(
    task: pb.TrainTask, values: np.ndarray, layout_id: int, dtype: int = pb.DTYPE_FLOAT32
) -> list[pb.LearnerMessage]:
    data = values.tobytes()
    payload = pb.Payload(
        payload_id=1,
        kind=pb.PAYLOAD_KIND_DELTA,
        dtype=dtype,
        total_bytes=len(data),
        num_chunks=1,
        layout_id=layout_id,
    )
    result = pb.TaskResult(
        task_id=task.task_id, base_version=task.model_version, payload=payload, num_examples=1
    )
    return [
        pb.LearnerMessage(result=result),
        pb.LearnerMessage(chunk=pb.Chunk(payload_id=1, index=0, data=data)),
    ]


def _expect_abort(raw: RawLearner, code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw.drain()
    assert info.value.code() == code  # type: ignore[attr-defined]
    assert match in info.value.details()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ federation


def test_synchronous_fedavg_round_is_the_example_weighted_mean(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1))
    threads = [
        _start_learner(ct.address, ShiftLearner(shift=1.0, examples=1), "a"),
        _start_learner(ct.address, ShiftLearner(shift=5.0, examples=3), "b"),
    ]

    assert ct.wait_finished(20)

    np.testing.assert_allclose(ct.model(), np.full(10, 4.0, np.float32))  # (1*1 + 3*5) / 4
    for thread, out in threads:
        thread.join(10)
        assert isinstance(out[0], RunSummary)
        assert out[0].shutdown_reason


def test_versions_advance_round_after_round(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=3))
    learner = ShiftLearner(shift=1.0, examples=5)
    _start_learner(ct.address, learner, "solo")

    assert ct.wait_finished(20)

    assert ct.read(lambda: ct.controller.version) == 3
    np.testing.assert_allclose(ct.model(), np.full(10, 3.0, np.float32))
    assert learner.fits == [0, 1, 2]


def test_models_far_larger_than_the_read_buffer_arrive_whole(controller_factory: Factory) -> None:
    # 1.2 MB models both ways through connections whose reads are capped at 4 KiB
    size = 300_000
    ct = controller_factory(
        sync_policy(min_learners=2, rounds=2),
        [np.zeros(size, dtype=np.float32)],
        read_buffer_bytes=4096,
    )
    threads = [
        _start_learner(ct.address, ShiftLearner(shift=1.0, examples=1, size=size), "a"),
        _start_learner(ct.address, ShiftLearner(shift=3.0, examples=1, size=size), "b"),
    ]

    assert ct.wait_finished(30)

    np.testing.assert_allclose(ct.model(), np.full(size, 4.0, np.float32))  # 2 rounds of +2
    for thread, out in threads:
        thread.join(10)
        assert isinstance(out[0], RunSummary)


def test_first_learner_provides_the_initial_model(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1), no_model=True)
    _start_learner(ct.address, ShiftLearner(shift=2.0, examples=1), "a")
    _start_learner(ct.address, ShiftLearner(shift=2.0, examples=1), "b")

    assert ct.wait_finished(20)

    np.testing.assert_allclose(ct.model(), np.full(10, 3.0, np.float32))  # ones + 2


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_learners_joining_at_once_without_a_model_break_no_contract(
    controller_factory: Factory, workers: int
) -> None:
    # Each process asks one of them in its Welcome; a learner asked by one worker while another
    # worker's learner became the provider is heard out, not cut off.
    ct = controller_factory(sync_policy(min_learners=6, rounds=1), no_model=True, workers=workers)
    learners = {f"l{i}": ShiftLearner(shift=2.0, examples=1) for i in range(6)}

    summaries = run_in_threads(ct.address, learners)

    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    assert ct.read(lambda: ct.controller.stats.protocol_errors_total) == 0
    assert all(len(s.errors) == 0 for s in summaries), [s.errors for s in summaries]
    np.testing.assert_allclose(ct.model(), np.full(10, 3.0, np.float32))


def test_evaluation_tasks_aggregate_metrics_per_version(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1, evaluate_every=1))
    _start_learner(ct.address, ShiftLearner(shift=1.0, examples=1), "a")
    _start_learner(ct.address, ShiftLearner(shift=1.0, examples=3), "b")

    assert ct.wait_finished(20)
    time.sleep(0.2)

    evaluations = ct.read(lambda: dict(ct.controller.evaluations))
    assert evaluations[0]["learners"] == 2
    assert evaluations[0]["examples"] == 4
    assert evaluations[0]["accuracy"] == pytest.approx(0.5)


def test_model_broadcast_is_serialized_once_per_version(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1))
    raws = [RawLearner(ct.address, f"r{i}") for i in range(2)]

    for raw in raws:
        _train_task(raw)

    broadcast = ct.read(lambda: ct.controller.store.broadcast())
    assert broadcast is ct.read(lambda: ct.controller.store.broadcast())
    for raw in raws:
        raw.close()


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def bad_and_good(
    controller_factory: Factory,
) -> tuple[ControllerThread, RawLearner, threading.Thread]:
    """A two-learner federation: a raw learner holding a train task, and a well-behaved one."""
    ct = controller_factory(sync_policy(min_learners=2, rounds=1, round_deadline_seconds=20))
    raw = RawLearner(ct.address, "bad")
    good, _ = _start_learner(ct.address, ShiftLearner(shift=1.0, examples=1, delay=0.2), "good")
    return ct, raw, good


def _assert_model_untouched_and_federation_continues(ct: ControllerThread) -> None:
    assert ct.wait_finished(20)
    # The round closed with the good learner's +1 alone; anything from "bad" would change it.
    np.testing.assert_allclose(ct.model(), np.full(10, 1.0, np.float32))
    assert ct.read(lambda: ct.controller.stats.protocol_errors_total) == 1


def test_payload_of_wrong_size_is_rejected_with_clear_status(bad_and_good) -> None:  # type: ignore[no-untyped-def]
    ct, raw, _ = bad_and_good
    task = _train_task(raw)
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]

    for m in _delta_result(task, np.ones(3, np.float32), layout_id):
        raw.send(m)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "payload has 12 bytes, the model has 40")
    _assert_model_untouched_and_federation_continues(ct)


def test_payload_of_wrong_dtype_is_rejected_with_clear_status(bad_and_good) -> None:  # type: ignore[no-untyped-def]
    ct, raw, _ = bad_and_good
    task = _train_task(raw)
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]

    for m in _delta_result(task, np.ones(5, np.float64), layout_id, dtype=pb.DTYPE_FLOAT64):
        raw.send(m)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "DTYPE_FLOAT64")
    _assert_model_untouched_and_federation_continues(ct)


def test_non_finite_update_is_rejected_before_aggregation(bad_and_good) -> None:  # type: ignore[no-untyped-def]
    ct, raw, _ = bad_and_good
    task = _train_task(raw)
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]
    values = np.ones(10, np.float32)
    values[4] = np.nan

    for m in _delta_result(task, values, layout_id):
        raw.send(m)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")
    _assert_model_untouched_and_federation_continues(ct)


def test_unknown_task_id_is_rejected_with_clear_status(bad_and_good) -> None:  # type: ignore[no-untyped-def]
    ct, raw, _ = bad_and_good
    task = _train_task(raw)
    task.task_id = "v0-t999"
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]

    for m in _delta_result(task, np.ones(10, np.float32), layout_id):
        raw.send(m)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "unknown task id 'v0-t999'")
    _assert_model_untouched_and_federation_continues(ct)


def test_garbage_bytes_are_rejected_with_clear_status(bad_and_good) -> None:  # type: ignore[no-untyped-def]
    ct, raw, _ = bad_and_good
    _train_task(raw)

    raw.send_raw(b"\xff\xff\xff\xff garbage \x00\x01")

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "could not parse LearnerMessage")
    _assert_model_untouched_and_federation_continues(ct)


def test_first_message_must_be_hello(controller_factory: Factory) -> None:
    ct = controller_factory()
    channel = grpc.insecure_channel(ct.address)
    join = channel.stream_stream("/metis_async.v1.Controller/Join")
    beat = pb.LearnerMessage(heartbeat=pb.Heartbeat()).SerializeToString()

    with pytest.raises(grpc.RpcError) as info:
        list(join(iter([beat])))

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "first message on a stream must be hello" in info.value.details()  # type: ignore[attr-defined]
    channel.close()


def test_stale_result_gets_in_band_error_and_stream_survives(controller_factory: Factory) -> None:
    # Goal 1 of 2 selected: the fast learner closes the round and the raw learner's task is void.
    # rounds=0: the federation never ends, so there is always a next task to wait for (with a
    # few rounds only, the fast learner could finish them all before the raw one reads on)
    policy = sync_policy(min_learners=2, learners_per_round=1, over_selection=2.0, rounds=0)
    ct = controller_factory(policy)
    raw = RawLearner(ct.address, "slow")
    _start_learner(ct.address, ShiftLearner(shift=1.0, examples=1), "fast")
    task = _train_task(raw)
    cancel = raw.until("cancel").cancel
    assert cancel.task_id == task.task_id
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]

    for m in _delta_result(task, np.ones(10, np.float32), layout_id):
        raw.send(m)

    error = raw.until("error").error
    assert error.code == pb.ERROR_CODE_STALE_TASK
    assert task.task_id in error.message
    assert raw.until("train").train.model_version >= 1  # still served on the same stream
    raw.close()


# ------------------------------------------------------------------------------ liveness, auth


def test_silent_learner_is_disconnected_after_heartbeat_timeout(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(
        sync_policy(min_learners=5), heartbeat_interval_seconds=0.1, heartbeat_timeout_seconds=0.5
    )
    raw = RawLearner(ct.address, "silent")
    raw.until("welcome")

    _expect_abort(raw, grpc.StatusCode.UNAVAILABLE, "no message for 0.5 s")
    deadline = time.monotonic() + 5
    while ct.read(lambda: ct.controller.sessions()) and time.monotonic() < deadline:
        time.sleep(0.01)  # the server cleans up just after the status is sent
    assert ct.read(lambda: ct.controller.sessions()) == []


def test_wrong_token_is_refused_and_learner_stops(controller_factory: Factory) -> None:
    ct = controller_factory(tokens={"a": "right"})

    with pytest.raises(LearnerStopped, match="invalid token"):
        run_learner(ct.address, ShiftLearner(1.0, 1), learner_id="a", token="wrong", backoff=FAST)


def test_right_token_is_accepted(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), tokens={"a": "right"})

    summary = run_learner(
        ct.address, ShiftLearner(1.0, 1), learner_id="a", token="right", backoff=FAST
    )

    assert summary.tasks_completed == 1


def test_learner_started_before_controller_connects_with_backoff(
    controller_factory: Factory,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    thread, out = _start_learner(f"127.0.0.1:{port}", ShiftLearner(1.0, 1), "early")
    time.sleep(0.5)

    ct = controller_factory(sync_policy(min_learners=1, rounds=1), port=port)
    assert ct.wait_finished(20)
    thread.join(10)

    summary = out[0]
    assert isinstance(summary, RunSummary)
    assert summary.errors  # it failed before the controller existed...
    assert summary.tasks_completed == 1  # ...and trained once it did


def test_learner_gives_up_after_max_attempts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backoff = Backoff(initial_seconds=0.01, max_seconds=0.02, max_attempts=3)

    with pytest.raises(LearnerStopped, match="gave up after 3 failed attempts"):
        run_learner(f"127.0.0.1:{port}", ShiftLearner(1.0, 1), backoff=backoff)


def test_reconnecting_learner_resumes_its_identity(controller_factory: Factory) -> None:
    ct = controller_factory(
        sync_policy(min_learners=1, rounds=2, train=TrainSettings(local_steps=1))
    )
    raw = RawLearner(ct.address, "same-id")
    _train_task(raw)
    raw.close()

    summary = run_learner(ct.address, ShiftLearner(1.0, 1), learner_id="same-id", backoff=FAST)

    assert summary.learner_id == "same-id"
    assert ct.wait_finished(10)
    np.testing.assert_allclose(ct.model(), np.full(10, 2.0, np.float32))


def test_initial_model_with_nan_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), no_model=True)
    raw = RawLearner(ct.address, "provider")
    assert raw.until("welcome").welcome.need_initial_model
    values = np.zeros(10, np.float32)
    values[3] = np.nan
    layout = wire.make_layout([values])
    header, chunks = wire.make_payload(values, 1, pb.PAYLOAD_KIND_WEIGHTS, layout.layout_id)
    raw.send(pb.LearnerMessage(layout=layout))
    raw.send(pb.LearnerMessage(initial_model=pb.InitialModel(payload=header)))
    for chunk in chunks:
        raw.send(pb.LearnerMessage(chunk=chunk))

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")
    assert not ct.read(lambda: ct.controller.store.ready)


BUNDLING = ["train", "delta", "bundle"]


def _kinds_in(bundle: pb.Bundle) -> list[str]:
    return [str(pb.ControllerMessage.FromString(m).WhichOneof("body")) for m in bundle.messages]


def test_a_learner_that_takes_bundles_gets_its_small_model_and_task_in_one_write(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=0))
    raw = RawLearner(ct.address, "bundled", capabilities=BUNDLING)
    raw.until("welcome")

    bundle = raw.until("bundle").bundle

    assert _kinds_in(bundle)[:4] == ["layout", "model", "chunk", "train"]  # then the status
    raw.close()


def test_a_learner_without_bundles_gets_separate_messages(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=0))
    raw = RawLearner(ct.address, "plain")

    kinds = [raw.next().WhichOneof("body") for _ in range(5)]

    assert kinds == ["welcome", "layout", "model", "chunk", "train"]
    raw.close()


def test_an_idle_stream_holds_no_writer_task_and_still_gets_later_messages(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=2, rounds=1))
    first = RawLearner(ct.address, "first", capabilities=BUNDLING)
    first.until("welcome")

    def writer_of(learner_id: str) -> object:
        return ct.controller.streams.sessions[learner_id].writer

    idle_writer = ct.read(lambda: writer_of("first"))
    second = RawLearner(ct.address, "second", capabilities=BUNDLING)
    bundle = first.until("bundle").bundle  # the round starts once the second one is in

    assert idle_writer is None
    assert "train" in _kinds_in(bundle)
    deadline = time.monotonic() + 5.0
    while ct.read(lambda: writer_of("first")) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ct.read(lambda: writer_of("first")) is None  # written, and idle again
    first.close()
    second.close()


def test_broadcasts_wait_their_turn_in_a_bundle_budget_smaller_than_one_bundle(
    controller_factory: Factory,
) -> None:
    # Every bundled write waits for the one before it to complete, and the streams' reads
    # wait while writes wait: rounds still complete, with the exact mean.
    ct = controller_factory(sync_policy(min_learners=4, rounds=3), bundle_buffer_bytes=1)
    shifts = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 6.0}
    threads = [
        _start_learner(ct.address, ShiftLearner(shift=shift, examples=1), lid)
        for lid, shift in shifts.items()
    ]

    assert ct.wait_finished(30)

    np.testing.assert_allclose(ct.model(), np.full(10, 3 * 3.0, np.float32))  # 3 rounds of +3
    for thread, out in threads:
        thread.join(10)
        assert isinstance(out[0], RunSummary)


def test_learners_announcing_the_same_capabilities_share_one_set() -> None:
    from metis_async.learners import DEFAULT_CAPABILITIES
    from metis_async.streams import capability_set

    first = capability_set(pb.Hello(capabilities=["train", "delta", "receipt"]).capabilities)
    second = capability_set(pb.Hello(capabilities=["train", "delta", "receipt"]).capabilities)

    assert first == {"train", "delta", "receipt"}
    assert first is second
    assert capability_set([]) is DEFAULT_CAPABILITIES


def test_random_capability_lists_do_not_grow_the_shared_sets() -> None:
    from metis_async import streams

    for i in range(3 * streams.CAPABILITY_SETS_KEPT):
        assert streams.capability_set(["train", f"made-up-{i}"]) == {"train", f"made-up-{i}"}

    assert len(streams._CAPABILITY_SETS) <= streams.CAPABILITY_SETS_KEPT


def _silent_stream(address: str, quiet: threading.Event) -> grpc.RpcError:
    """Open a Join stream that sends nothing until `quiet` is set; the error that ends it."""

    def nothing() -> Iterator[bytes]:
        quiet.wait(30)
        return
        yield b""  # a generator that yields nothing

    channel = grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
    try:
        for _ in channel.stream_stream("/metis_async.v1.Controller/Join")(nothing()):
            pass
    except grpc.RpcError as error:
        return error
    finally:
        quiet.set()
        channel.close()
    raise AssertionError("the stream ended without an error")


def test_a_stream_without_a_hello_is_ended_at_the_hello_timeout(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), hello_timeout_seconds=0.6)
    started = time.monotonic()

    errors: list[grpc.RpcError] = []
    threads = [
        threading.Thread(
            target=lambda: errors.append(_silent_stream(ct.address, threading.Event()))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    took = time.monotonic() - started
    assert [e.code() for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    assert all("no hello received in time" in (e.details() or "") for e in errors)
    assert 0.6 <= took < 5.0


def test_a_learner_whose_hello_arrives_in_time_is_not_timed_out(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=2), hello_timeout_seconds=0.6)

    summary = run_learner(ct.address, ShiftLearner(1.0, 5), learner_id="on-time")

    assert ct.wait_finished(30)
    assert summary.tasks_completed == 2
    assert summary.errors == []
