"""One event trace, two drivers: the simulator and the gRPC server give the same federation.

A simulated federation (real policies, real training, dropouts, deadlines) records every event
it delivers to the federation core. The trace is then replayed through a real controller on
127.0.0.1: each join opens a real stream, each upload sends the recorded bytes as chunks over
gRPC, each loss closes a stream, each tick runs on the controller's (manual) clock. After every
step the controller's version and model digest must equal the simulator's, and the commit
records (which tasks each version folded in) must be the same.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from metis_async import wire
from metis_async.federation import UpdateReport
from metis_async.protocols import (
    BufferedPolicy,
    BufferedSettings,
    Policy,
    SynchronousPolicy,
    SynchronousSettings,
    TrainSettings,
)
from metis_async.simulation import SimulatedFederation, SpeedModel
from metis_async.simulation.federation import TraceStep
from metis_async.v1 import controller_pb2 as pb
from tests.conftest import ControllerThread, ShiftLearner

RUN_ID = "parity"
SIZE = 300  # parameters: 2 chunks of 1 KiB... with max_chunk_bytes below
CHUNK = 1024


class ManualClock:
    """The controller's clock, set by the replay to each recorded event's time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NoisyLearner(ShiftLearner):
    """Trains to a seeded random point: every upload has distinct, non-trivial bytes."""

    def __init__(self, seed: int, examples: int) -> None:
        super().__init__(0.0, examples, size=SIZE)
        self._rng = np.random.default_rng(seed)

    def fit(self, parameters: Any, config: Any) -> Any:
        (w,) = parameters
        step = self._rng.normal(0.0, 0.1, size=w.shape).astype(np.float32)
        return [w + step], self.examples, {"loss": float(np.abs(step).mean())}


class ReplayLearner:
    """One learner's real gRPC stream, driven by the replay."""

    def __init__(self, address: str, learner_id: str, num_examples: int) -> None:
        self.learner_id = learner_id
        self.tasks: dict[str, pb.TrainTask | pb.EvaluateTask] = {}
        self._outbox: queue.SimpleQueue[pb.LearnerMessage | None] = queue.SimpleQueue()
        self._arrived = threading.Condition()
        self._payloads = 0
        self._channel = grpc.insecure_channel(address)
        join = self._channel.stream_stream(
            "/metis_async.v1.Controller/Join",
            request_serializer=pb.LearnerMessage.SerializeToString,
            response_deserializer=pb.ControllerMessage.FromString,
        )
        hello = pb.Hello(
            learner_id=learner_id,
            num_examples=num_examples,
            capabilities=["train", "evaluate", "delta"],
        )
        self._outbox.put(pb.LearnerMessage(hello=hello))
        self._responses = join(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.LearnerMessage]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for message in self._responses:
                kind = message.WhichOneof("body")
                if kind in ("train", "evaluate"):
                    task = getattr(message, kind)
                    with self._arrived:
                        self.tasks[task.task_id] = task
                        self._arrived.notify_all()
        except grpc.RpcError:
            pass  # closed by the replay or the controller

    def task(self, task_id: str, timeout: float = 10.0) -> pb.TrainTask | pb.EvaluateTask:
        with self._arrived:
            if not self._arrived.wait_for(lambda: task_id in self.tasks, timeout):
                raise AssertionError(f"{self.learner_id} never received task {task_id}")
            return self.tasks[task_id]

    def upload(self, report: UpdateReport, update: wire.FloatVector, layout_id: int) -> None:
        task = self.task(report.task_id)
        assert isinstance(task, pb.TrainTask)
        kind = pb.PAYLOAD_KIND_DELTA if task.upload_delta else pb.PAYLOAD_KIND_WEIGHTS
        self._payloads += 1
        header, chunks = wire.make_payload(update, self._payloads, kind, layout_id, CHUNK)
        result = pb.TaskResult(
            task_id=report.task_id,
            base_version=report.base_version,
            payload=header,
            num_examples=report.num_examples,
            completed_steps=report.completed_steps,
            train_seconds=report.train_seconds,
            seconds_per_batch=report.seconds_per_batch,
            seconds_per_epoch=report.seconds_per_epoch,
            metrics=dict(report.metrics),
        )
        self._outbox.put(pb.LearnerMessage(result=result))
        for chunk in chunks:
            self._outbox.put(pb.LearnerMessage(chunk=chunk))

    def evaluation(self, task_id: str, num_examples: int, metrics: dict[str, float]) -> None:
        task = self.task(task_id)
        result = pb.TaskResult(
            task_id=task_id,
            base_version=task.model_version,
            num_examples=num_examples,
            metrics=metrics,
        )
        self._outbox.put(pb.LearnerMessage(result=result))

    def close(self) -> None:
        self._outbox.put(None)
        self._responses.cancel()
        self._channel.close()


def _simulate(policy: Policy, seconds: float) -> tuple[SimulatedFederation, list[TraceStep]]:
    learners = [NoisyLearner(seed=i, examples=10 + 7 * i) for i in range(6)]
    sim = SimulatedFederation(
        policy,
        learners,
        [np.zeros(SIZE, dtype=np.float32)],
        lambda params: 0.0,
        speeds=SpeedModel(dropout_probability=0.15, downtime_seconds=0.5),
        seed=7,
        run_id=RUN_ID,
        record=True,
    )
    sim.run(seconds)
    assert sim.trace is not None
    return sim, sim.trace


def _replay(trace: list[TraceStep], policy: Policy) -> ControllerThread:
    clock = ManualClock()
    ct = ControllerThread(
        policy,
        [np.zeros(SIZE, dtype=np.float32)],
        run_id=RUN_ID,
        clock=clock,
        max_chunk_bytes=CHUNK,
        heartbeat_timeout_seconds=600.0,
    )
    streams: dict[str, ReplayLearner] = {}
    layout_id = ct.read(lambda: ct.controller.store.layout.layout_id)  # type: ignore[union-attr]
    try:
        for index, step in enumerate(trace):
            expected = ct.read(lambda: ct.controller.core.events_handled) + 1
            now, *args = step.args
            clock.now = float(now)  # type: ignore[arg-type]
            if step.method == "learner_joined":
                lid, examples = str(args[0]), int(args[1])  # type: ignore[call-overload]
                streams[lid] = ReplayLearner(ct.address, lid, examples)
            elif step.method == "learner_lost":
                streams.pop(str(args[0])).close()
            elif step.method == "update_arrived":
                report, update = args[1], args[2]
                assert isinstance(report, UpdateReport)
                streams[str(args[0])].upload(report, update, layout_id)  # type: ignore[arg-type]
            elif step.method == "evaluation_arrived":
                lid, task_id, examples, metrics = args
                streams[str(lid)].evaluation(str(task_id), int(examples), dict(metrics))  # type: ignore[call-overload]
            elif step.method == "tick":
                ct.call(ct.controller.tick())
            else:
                raise AssertionError(f"unknown step {step.method}")
            _wait(lambda n=expected: ct.read(lambda: ct.controller.core.events_handled) >= n)
            state = ct.read(lambda: (ct.controller.core.version, _digest(ct.controller.core.model)))
            assert state == (step.version, step.model_digest), f"step {index}: {step.method}"
    finally:
        for stream in streams.values():
            stream.close()
    return ct


def _wait(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the controller did not handle the step in time")
        time.sleep(0.002)


def _digest(model: wire.FloatVector) -> str:
    return hashlib.blake2b(np.ascontiguousarray(model).tobytes(), digest_size=16).hexdigest()


def _buffered() -> Policy:
    train = TrainSettings(local_steps=5)
    return BufferedPolicy(BufferedSettings(concurrency=4, buffer_size=2, train=train, seed=3))


def _synchronous() -> Policy:
    settings = SynchronousSettings(
        min_learners=3,
        learners_per_round=3,
        over_selection=1.4,
        round_deadline_seconds=0.3,
        evaluate_every=2,
        train=TrainSettings(local_steps=10),
        seed=3,
    )
    return SynchronousPolicy(settings)


@pytest.mark.parametrize("make_policy", [_buffered, _synchronous], ids=["buffered", "sync"])
def test_trace_through_grpc_gives_the_simulators_versions_and_models(make_policy: Any) -> None:
    sim, trace = _simulate(make_policy(), seconds=4.0)
    methods = {step.method for step in trace}
    assert {"learner_joined", "learner_lost", "update_arrived"} <= methods
    assert sim.version >= 5

    ct = _replay(trace, make_policy())
    try:
        grpc_commits = ct.read(lambda: list(ct.controller.core.commits))
        grpc_model = ct.read(lambda: np.array(ct.controller.core.model))
    finally:
        ct.close()

    assert grpc_commits == list(sim.core.commits)
    assert grpc_model.tobytes() == np.asarray(sim.core.model).tobytes()


def test_the_sync_trace_has_deadlines_and_evaluations() -> None:
    _, trace = _simulate(_synchronous(), seconds=4.0)

    methods = [step.method for step in trace]

    assert "tick" in methods
    assert "evaluation_arrived" in methods
