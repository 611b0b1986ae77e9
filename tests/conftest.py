"""Shared fixtures: a real controller on 127.0.0.1 (port 0) running in a background event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import settings

from metis_async.aggregation.server_step import AggregationSettings
from metis_async.client import Backoff, EvaluateConfig, FitConfig, Learner, NDArrays, run_learner
from metis_async.protocols import Policy, SynchronousPolicy, SynchronousSettings, TrainSettings
from metis_async.server import Controller, ControllerConfig
from metis_async.telemetry import configure_logging
from metis_async.v1 import controller_pb2 as pb
from metis_async.workers.hub import WorkerHub

configure_logging("error")  # controllers run in background threads: keep test output readable

settings.register_profile("fast", max_examples=40, deadline=None)
settings.register_profile("slow", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

T = TypeVar("T")


class ControllerThread:
    """A `Controller` served on its own event loop in a daemon thread, driven from tests."""

    def __init__(
        self,
        policy: Policy,
        initial_model: NDArrays | None,
        aggregation: AggregationSettings | None = None,
        **config: Any,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config.setdefault("port", 0)
        extra = {k: config.pop(k) for k in ("run_id", "clock", "on_commit") if k in config}
        workers = int(config.pop("workers", 0))
        cfg = ControllerConfig(host="127.0.0.1", **config)

        async def make() -> Controller | WorkerHub:
            if workers:
                extra.pop("clock", None)
                return WorkerHub(
                    policy,
                    cfg,
                    workers=workers,
                    initial_model=initial_model,
                    aggregation=aggregation,
                    log_level="error",
                    **extra,
                )
            return Controller(
                policy, cfg, initial_model=initial_model, aggregation=aggregation, **extra
            )

        self.controller = self.call(make())
        self.port = self.call(self.controller.start())
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the controller's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def read(self, fn: Callable[[], T]) -> T:
        """Evaluate `fn` on the controller's loop (safe access to its state)."""

        async def run() -> T:
            return fn()

        return self.call(run())

    def wait_finished(self, timeout: float = 30.0) -> bool:
        return self.call(self.controller.wait_finished(timeout), timeout + 5)

    def model(self) -> np.ndarray:
        return self.read(lambda: np.array(self.controller.store.flat))

    def close(self) -> None:
        self.call(self.controller.stop(grace_seconds=0.5))
        self.call(_end_leftover_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


async def _end_leftover_tasks() -> None:
    """Cancel what still runs on a stopped controller's loop (gRPC's last handler steps) and
    let it finish, as `asyncio.run` does: a loop closed with them pending left "Task was
    destroyed but it is pending!" at the end of the test run."""
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)


@pytest.fixture
def controller_factory() -> Iterator[Callable[..., ControllerThread]]:
    """Build controllers that are stopped at the end of the test."""
    made: list[ControllerThread] = []

    def make(
        policy: Policy | None = None, initial_model: NDArrays | None = None, **config: Any
    ) -> ControllerThread:
        policy = policy or SynchronousPolicy(SynchronousSettings(min_learners=1))
        if initial_model is None and "no_model" not in config:
            initial_model = [np.zeros(10, dtype=np.float32)]
        config.pop("no_model", None)
        ct = ControllerThread(policy, initial_model, **config)
        made.append(ct)
        return ct

    yield make
    for ct in made:
        ct.close()


def sync_policy(**kw: Any) -> SynchronousPolicy:
    """A synchronous policy with quick local-training settings."""
    kw.setdefault("train", TrainSettings(local_steps=1))
    return SynchronousPolicy(SynchronousSettings(**kw))


class ShiftLearner(Learner):
    """Adds a fixed `shift` to every parameter: FedAvg results are exact to check."""

    def __init__(self, shift: float, examples: int, size: int = 10, delay: float = 0.0) -> None:
        self.shift = shift
        self.examples = examples
        self.size = size
        self.delay = delay
        self.fits: list[int] = []

    def get_parameters(self) -> NDArrays:
        return [np.full(self.size, 1.0, dtype=np.float32)]

    def fit(
        self, parameters: NDArrays, config: FitConfig
    ) -> tuple[NDArrays, int, dict[str, float]]:
        self.fits.append(config.model_version)
        if self.delay:
            threading.Event().wait(self.delay)
        return [p + np.float32(self.shift) for p in parameters], self.examples, {"loss": 0.0}

    def evaluate(
        self, parameters: NDArrays, config: EvaluateConfig
    ) -> tuple[float, int, dict[str, float]]:
        return float(np.abs(parameters[0]).mean()), self.examples, {"accuracy": 0.5}

    def num_examples(self) -> int:
        return self.examples


class ShiftLearners:
    """Reference clients (`run_learner` with `ShiftLearner`s) in threads, one per learner id;
    `join` waits for them and returns each one's `RunSummary`, or the exception it raised."""

    def __init__(self, address: str, shifts: dict[str, float], size: int = 10) -> None:
        self._out: list[Any] = []

        def run(learner_id: str, shift: float) -> None:
            backoff = Backoff(initial_seconds=0.05, max_seconds=0.5, max_attempts=40)
            try:
                learner = ShiftLearner(shift, 1, size=size)
                summary = run_learner(address, learner, learner_id=learner_id, backoff=backoff)
                self._out.append(summary)
            except BaseException as error:  # surfaced by join
                self._out.append(error)

        self._threads = [
            threading.Thread(target=run, args=item, daemon=True) for item in shifts.items()
        ]
        for thread in self._threads:
            thread.start()

    def join(self, timeout_seconds: float = 10.0) -> list[Any]:
        for thread in self._threads:
            thread.join(timeout_seconds)
        return list(self._out)


def run_in_threads(
    address: str,
    learners: Mapping[str, Learner],
    per_learner: Callable[[str], dict[str, Any]] | None = None,
    **common: Any,
) -> list[Any]:
    """`run_learner` for each learner id in its own thread, until all end (60 s at most);
    returns each one's `RunSummary`, or the exception it raised, in the order they ended.
    `common` and `per_learner(learner_id)` are more `run_learner` arguments."""
    out: list[Any] = []

    def run(learner_id: str, learner: Learner) -> None:
        backoff = Backoff(initial_seconds=0.05, max_seconds=0.5, max_attempts=40)
        extra = {**common, **(per_learner(learner_id) if per_learner else {})}
        try:
            out.append(
                run_learner(address, learner, learner_id=learner_id, backoff=backoff, **extra)
            )
        except BaseException as error:  # surfaced to the test
            out.append(error)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in learners.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return out


class RawLearner:
    """A hand-driven stream for speaking the wire protocol directly (good and bad messages)."""

    def __init__(
        self,
        address: str,
        learner_id: str = "raw",
        num_examples: int = 1,
        credentials: grpc.ChannelCredentials | None = None,
        **hello: Any,
    ) -> None:
        # its own connection (learners of one process otherwise share one)
        options = [("grpc.use_local_subchannel_pool", 1)]
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options)
        self._out: list[bytes | None] = []
        self._cv = threading.Condition()
        join = self.channel.stream_stream("/metis_async.v1.Controller/Join")
        self.responses = join(self._requests())
        greeting = pb.Hello(learner_id=learner_id, num_examples=num_examples, **hello)
        self.send(pb.LearnerMessage(hello=greeting))

    def _requests(self) -> Iterator[bytes]:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._out))
                item = self._out.pop(0)
            if item is None:
                return
            yield item

    def send_raw(self, data: bytes | None) -> None:
        with self._cv:
            self._out.append(data)
            self._cv.notify()

    def send(self, message: pb.LearnerMessage) -> None:
        self.send_raw(message.SerializeToString())

    def next(self) -> pb.ControllerMessage:
        return pb.ControllerMessage.FromString(next(self.responses))

    def until(self, kind: str) -> pb.ControllerMessage:
        """Read messages until one of `kind` arrives."""
        while True:
            message = self.next()
            if message.WhichOneof("body") == kind:
                return message

    def drain(self) -> None:
        """Read until the stream ends (raises grpc.RpcError when it ends with an error)."""
        for _ in self.responses:
            pass

    def close(self) -> None:
        self.send_raw(None)
        self.channel.close()
