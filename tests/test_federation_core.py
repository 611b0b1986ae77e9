"""The federation core through the real controller on 127.0.0.1: state that outlives sessions,
limits, the initial-model flow, status, held models, capabilities and refused commits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from metis_async import wire
from metis_async.client import Backoff, run_learner
from metis_async.protocols import BufferedPolicy, BufferedSettings, TrainSettings
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import _delta_result, _expect_abort

Factory = Callable[..., ControllerThread]
FAST = Backoff(initial_seconds=0.05, max_seconds=0.5, max_attempts=40)


def _layout_id(ct: ControllerThread) -> int:
    return ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]


def _send_model(raw: RawLearner, values: np.ndarray) -> None:
    layout = wire.make_layout([values])
    header, chunks = wire.make_payload(values, 1, pb.PAYLOAD_KIND_WEIGHTS, layout.layout_id)
    raw.send(pb.LearnerMessage(layout=layout))
    raw.send(pb.LearnerMessage(initial_model=pb.InitialModel(payload=header)))
    for chunk in chunks:
        raw.send(pb.LearnerMessage(chunk=chunk))


def _model_requested(raw: RawLearner) -> bool:
    message = raw.until("status")
    return message.status.need_initial_model


# ------------------------------------------------------------------------------ identity


def test_task_ids_carry_the_run_id(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), run_id="run42")
    raw = RawLearner(ct.address, "a")

    task = raw.until("train").train

    assert task.task_id.startswith("run42.1-")  # run id, then the controller start
    raw.close()


def test_committed_answer_resent_after_a_reconnect_is_acknowledged(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1))
    first = RawLearner(ct.address, "a")
    task = first.until("train").train
    for message in _delta_result(task, np.ones(10, np.float32), _layout_id(ct)):
        first.send(message)
    first.until("train")  # the next round: the result was taken
    first.close()

    again = RawLearner(ct.address, "a")  # a new session of the same learner
    for message in _delta_result(task, np.ones(10, np.float32), _layout_id(ct)):
        again.send(message)

    ack = again.until("ack").ack  # counted once, in version 1: the learner may forget it
    assert (ack.task_id, ack.version) == (task.task_id, 1)
    again.close()


def test_a_rounds_learners_share_one_task_id_and_each_answers_it_once(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=2))
    a, b = RawLearner(ct.address, "a"), RawLearner(ct.address, "b")
    task_a, task_b = a.until("train").train, b.until("train").train
    layout_id = _layout_id(ct)
    for message in _delta_result(task_a, np.ones(10, np.float32), layout_id):
        a.send(message)
    for message in _delta_result(task_a, np.ones(10, np.float32), layout_id):
        a.send(message)  # a's result again: a duplicate, whoever else holds the id

    duplicate = a.until("error").error
    for message in _delta_result(task_b, np.full(10, 3.0, np.float32), layout_id):
        b.send(message)  # b's answer to the same id is b's own update
    a.until("train")

    assert task_a.task_id == task_b.task_id  # one id: the same task bytes for both
    assert duplicate.code == pb.ERROR_CODE_DUPLICATE
    np.testing.assert_allclose(ct.model(), np.full(10, 2.0, np.float32))  # mean of 1 and 3
    a.close()
    b.close()


def test_a_learner_is_welcomed_while_the_core_thread_is_busy(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1))
    release = threading.Event()
    runner = ct.controller._runner  # the core thread, held until released
    busy = asyncio.run_coroutine_threadsafe(runner.query(lambda: release.wait(30)), ct.loop)
    raw = RawLearner(ct.address, "a")

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(raw.next).result(timeout=20)
        welcomed_while_busy = not busy.done()
        release.set()
        task = pool.submit(raw.until, "train").result(timeout=20)

    assert first.WhichOneof("body") == "welcome"
    assert welcomed_while_busy  # the Welcome did not wait for the core to take the join
    assert task.train.task_id  # the join reached the core afterwards all the same
    raw.close()


# ------------------------------------------------------------------------------ limits


def test_too_long_learner_id_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(max_learner_id_length=16)
    raw = RawLearner(ct.address, "x" * 17)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "longer than 16 bytes")


def test_num_examples_above_the_cap_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(max_num_examples=1000)
    raw = RawLearner(ct.address, "a", num_examples=2**63)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "num_examples")


def test_result_claiming_too_many_examples_is_refused(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), max_num_examples=1000)
    raw = RawLearner(ct.address, "a")
    task = raw.until("train").train
    messages = _delta_result(task, np.ones(10, np.float32), _layout_id(ct))
    messages[0].result.num_examples = 10**6

    for message in messages:
        raw.send(message)

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "limit is 1000")
    assert ct.read(lambda: ct.controller.version) == 0


def test_a_huge_announced_layout_is_refused_before_allocation(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), no_model=True)
    raw = RawLearner(ct.address, "provider")
    assert raw.until("welcome").welcome.need_initial_model
    layout = pb.ModelLayout(layout_id=1, total_bytes=2**40)
    layout.tensors.add(name="t0", shape=[2**38], dtype=pb.DTYPE_FLOAT32, offset=0, nbytes=2**40)

    raw.send(pb.LearnerMessage(layout=layout))

    _expect_abort(raw, grpc.StatusCode.INVALID_ARGUMENT, "max_model_bytes")


# ------------------------------------------------------------------------------ first model


def test_another_learner_is_asked_when_the_provider_leaves(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1, rounds=1), no_model=True)
    provider = RawLearner(ct.address, "first")
    assert provider.until("welcome").welcome.need_initial_model
    waiting = RawLearner(ct.address, "second")
    assert not waiting.until("welcome").welcome.need_initial_model

    provider.close()

    assert _model_requested(waiting) or _model_requested(waiting)
    _send_model(waiting, np.zeros(10, np.float32))
    assert waiting.until("train").train.model_version == 0


def test_another_learner_is_asked_when_the_provider_is_refused(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1), no_model=True)
    provider = RawLearner(ct.address, "first")
    provider.until("welcome")
    waiting = RawLearner(ct.address, "second")
    waiting.until("welcome")

    _send_model(provider, np.full(10, np.inf, np.float32))

    _expect_abort(provider, grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")
    assert _model_requested(waiting) or _model_requested(waiting)


def test_another_learner_is_asked_when_the_provider_stalls(controller_factory: Factory) -> None:
    ct = controller_factory(
        sync_policy(min_learners=1), no_model=True, initial_model_timeout_seconds=0.3
    )
    provider = RawLearner(ct.address, "first")
    provider.until("welcome")
    waiting = RawLearner(ct.address, "second")
    waiting.until("welcome")

    # the provider says nothing; after the timeout the other learner is asked
    assert _model_requested(waiting) or _model_requested(waiting)
    provider.close()


# ------------------------------------------------------------------------------ status


def test_a_learner_is_told_the_federation_waits_for_more(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=3))
    first = RawLearner(ct.address, "a")
    first_welcome = first.until("welcome").welcome
    _wait_until(lambda: ct.read(lambda: ct.controller.core.connected) == 1)
    second = RawLearner(ct.address, "b")

    welcome = second.until("welcome").welcome

    assert welcome.state == pb.FEDERATION_STATE_WAITING_FOR_LEARNERS
    assert (welcome.learners_connected, welcome.learners_needed) == (1, 3)  # before b
    assert (first_welcome.learners_connected, first_welcome.learners_needed) == (0, 3)
    first.close()
    second.close()


def _wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_state_change_reaches_every_learner_as_a_status(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2))
    first = RawLearner(ct.address, "a")
    first.until("welcome")
    second = RawLearner(ct.address, "b")

    status = first.until("status").status  # its own wait was in its Welcome; this is the change

    assert status.state == pb.FEDERATION_STATE_TRAINING
    assert (status.learners_connected, status.learners_needed) == (2, 2)
    first.close()
    second.close()


# ------------------------------------------------------------------------------ held models


def _first_of(raw: RawLearner, kinds: set[str]) -> str:
    while True:
        kind = raw.next().WhichOneof("body")
        if kind in kinds:
            return str(kind)


def test_a_model_held_from_this_run_is_not_sent_again(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), run_id="r1")
    layout_id = _layout_id(ct)
    raw = RawLearner(
        ct.address,
        "a",
        holds_model=True,
        held_version=0,
        held_run_id="r1",
        held_layout_id=layout_id,
    )

    assert _first_of(raw, {"model", "train"}) == "train"
    raw.close()


@pytest.mark.parametrize(("run", "layout_shift"), [("other-run", 0), ("r1", 1)])
def test_a_stale_claim_gets_the_model(
    controller_factory: Factory, run: str, layout_shift: int
) -> None:
    ct = controller_factory(sync_policy(min_learners=1), run_id="r1")
    raw = RawLearner(
        ct.address,
        "a",
        holds_model=True,
        held_version=0,
        held_run_id=run,
        held_layout_id=_layout_id(ct) + layout_shift,
    )

    assert _first_of(raw, {"model", "train"}) == "model"
    raw.close()


# ------------------------------------------------------------------------------ capabilities


def test_no_evaluation_tasks_for_a_learner_that_cannot_evaluate(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=1, evaluate_every=1, rounds=2))
    raw = RawLearner(ct.address, "a", capabilities=["train", "delta"])

    for _ in range(2):
        task = _first_of(raw, {"train", "evaluate"})
        assert task == "train"
        train = raw.until("train").train if task != "train" else None
        del train
        break
    raw.close()
    assert ct.read(lambda: ct.controller.stats.evaluations_received_total) == 0


def test_learners_receive_the_final_model(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2, learners_per_round=1, rounds=1))
    learners = [ShiftLearner(1.0, 10), ShiftLearner(1.0, 10)]
    import threading

    summaries: list[object] = []
    threads = [
        threading.Thread(
            target=lambda i=i: summaries.append(
                run_learner(ct.address, learners[i], learner_id=f"l{i}", backoff=FAST)
            ),
            daemon=True,
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    final = ct.model()
    assert len(summaries) == 2
    for summary in summaries:
        assert summary.final_version == 1  # type: ignore[attr-defined]
        np.testing.assert_array_equal(summary.final_parameters[0], final)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ commits


def test_a_commit_that_would_overflow_is_refused_and_the_model_stays(
    controller_factory: Factory,
) -> None:
    policy = BufferedPolicy(
        BufferedSettings(buffer_size=1, concurrency=1, train=TrainSettings(local_steps=1))
    )
    start = np.full(10, 3e38, np.float32)
    ct = controller_factory(policy, initial_model=[start])
    raw = RawLearner(ct.address, "a")
    task = raw.until("train").train

    for message in _delta_result(task, np.full(10, 3e38, np.float32), _layout_id(ct)):
        raw.send(message)

    retry = raw.until("train").train  # the federation goes on from the same version
    assert retry.model_version == 0
    assert ct.read(lambda: ct.controller.stats.commits_refused_total) == 1
    np.testing.assert_array_equal(ct.model(), start)
    raw.close()


# ------------------------------------------------------------------------------ randomness


def _picks(seed: int) -> list[str]:
    import random

    from metis_async.effects import SendTask
    from metis_async.federation import FederationCore

    policy = BufferedPolicy(BufferedSettings(concurrency=3, buffer_size=2, min_learners=20))
    core = FederationCore(policy, rng=random.Random(seed), run_id="r")
    model = [np.zeros(4, np.float32)]
    layout = wire.make_layout(model)
    core.initialize_model(0.0, layout, wire.flatten(model, layout))
    effects = []
    for i in range(20):
        effects += core.learner_joined(0.0, f"l{i:02d}", 1)
    return [e.task.learner_id for e in effects if isinstance(e, SendTask)]


def test_learner_picks_follow_the_generator_the_driver_passes() -> None:
    assert _picks(1) == _picks(1)
    assert _picks(1) != _picks(2)
