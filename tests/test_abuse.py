"""Abuse limits on a real controller: floods are cut off, the learner count is capped, and
learners that take tasks but never answer are benched so synchronous rounds go on."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, RawLearner, ShiftLearner, sync_policy
from tests.test_server import _expect_abort, _start_learner

Factory = Callable[..., ControllerThread]
HEARTBEAT = pb.LearnerMessage(heartbeat=pb.Heartbeat(sent_unix_seconds=1.0))


def test_a_flooding_learner_is_cut_off_and_the_others_finish(controller_factory: Factory) -> None:
    ct = controller_factory(
        sync_policy(min_learners=1, rounds=2), max_messages_per_second=50.0, message_burst=100
    )
    flood = RawLearner(ct.address, "flood")
    flood.until("welcome")
    for _ in range(2000):
        flood.send(HEARTBEAT)

    _expect_abort(flood, grpc.StatusCode.RESOURCE_EXHAUSTED, "more than 50 messages a second")
    thread, _out = _start_learner(ct.address, ShiftLearner(1.0, 1), "honest")
    assert ct.wait_finished(30)
    thread.join(10)

    assert ct.controller.version == 2
    assert ct.read(lambda: ct.controller.stats.learners_cut_off_total) == 1


def test_learners_beyond_the_limit_are_refused_until_one_leaves(
    controller_factory: Factory,
) -> None:
    ct = controller_factory(sync_policy(min_learners=5), max_learners=2)
    first, second = RawLearner(ct.address, "a"), RawLearner(ct.address, "b")
    first.until("welcome")
    second.until("welcome")

    _expect_abort(RawLearner(ct.address, "c"), grpc.StatusCode.RESOURCE_EXHAUSTED, "maximum of 2")
    first.close()
    deadline = time.monotonic() + 10
    while ct.read(lambda: len(ct.controller.streams.sessions)) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    third = RawLearner(ct.address, "c").until("welcome")

    assert third.welcome.learner_id == "c"


def _fakes(ct: ControllerThread, count: int, stop: threading.Event) -> list[RawLearner]:
    """Learners that take tasks and heartbeat but never train (read, never answer)."""
    fakes = [RawLearner(ct.address, f"fake{i}") for i in range(count)]

    def read(raw: RawLearner) -> None:
        try:
            for _ in raw.responses:
                if stop.is_set():
                    return
        except grpc.RpcError:
            pass

    for raw in fakes:
        threading.Thread(target=read, args=(raw,), daemon=True).start()
    return fakes


def _run_with_fakes(controller_factory: Factory, max_missed_tasks: int) -> ControllerThread:
    policy = sync_policy(
        min_learners=2, rounds=3, round_deadline_seconds=0.3, min_update_fraction=0.5
    )
    ct = controller_factory(policy, max_missed_tasks=max_missed_tasks, bench_seconds=600.0)
    stop = threading.Event()
    fakes = _fakes(ct, 4, stop)
    honest = [_start_learner(ct.address, ShiftLearner(1.0, 1), f"h{i}") for i in range(2)]
    ct.wait_finished(6)
    stop.set()
    for raw in fakes:
        raw.close()
    del honest
    return ct


def test_fake_learners_are_benched_and_rounds_go_on(controller_factory: Factory) -> None:
    ct = _run_with_fakes(controller_factory, max_missed_tasks=2)

    assert ct.controller.finished
    assert ct.controller.version == 3
    assert ct.read(lambda: ct.controller.stats.learners_benched_total) == 4
    np.testing.assert_array_equal(ct.model(), np.full(10, 3.0, np.float32))


def test_without_benching_fake_learners_stall_every_round(controller_factory: Factory) -> None:
    ct = _run_with_fakes(controller_factory, max_missed_tasks=0)

    assert not ct.controller.finished  # 2 of 6 updates never reach the half every round needs
    assert ct.controller.version == 0


def test_limits_reload_without_a_restart(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=5))
    for name in ("a", "b"):
        RawLearner(ct.address, name).until("welcome")
    fresh = dataclasses.replace(ct.controller.config, max_learners=2)

    ct.read(lambda: ct.controller.reload_credentials(fresh))

    _expect_abort(RawLearner(ct.address, "c"), grpc.StatusCode.RESOURCE_EXHAUSTED, "maximum of 2")
