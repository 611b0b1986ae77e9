"""The learner's run loop: one outbound stream, tasks in a worker thread, reconnect with backoff.

`run_learner(address, learner)` dials the controller, says hello, and then serves tasks until the
controller says the federation is over. Three threads share the work: the caller's thread reads the
stream (so cancellations and new models arrive while training runs), a worker thread runs `fit` and
`evaluate` one task at a time, and a heartbeat thread keeps the session alive. When the stream
breaks, the loop reconnects with jittered exponential backoff and reuses its learner id.

Only grpcio, protobuf and numpy are needed here.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from metis_async import wire
from metis_async.client.learner import EvaluateConfig, FitConfig, Learner
from metis_async.v1 import controller_pb2 as pb

log = logging.getLogger("metis_async.client")

JOIN_METHOD = "/metis_async.v1.Controller/Join"
FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class LearnerStopped(Exception):
    """The learner gave up: a fatal status from the controller or too many failed attempts."""


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff between connection attempts.

    The n-th consecutive failure waits a uniform time in [d/2, d] with d = min(cap, initial·2^n)
    seconds, so thousands of learners reconnecting after a controller restart spread out.
    """

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    max_attempts: int | None = None  # consecutive failures before giving up; None = never

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after `failures` consecutive failed attempts (≥ 1)."""
        ceiling = min(self.max_seconds, self.initial_seconds * 2 ** min(failures - 1, 30))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


@dataclass
class RunSummary:
    """What one `run_learner` call did."""

    learner_id: str = ""
    tasks_completed: int = 0
    tasks_failed: int = 0
    sessions: int = 0
    last_version: int | None = None
    shutdown_reason: str = ""
    errors: list[str] = field(default_factory=list)


def _log(event: str, **fields: object) -> None:
    log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))


class _Stream:
    """One session: the outbox feeding the request stream, and the models received on it."""

    def __init__(self, learner_id: str, num_examples: int, token: str) -> None:
        self.outbox: queue.SimpleQueue[pb.LearnerMessage | None] = queue.SimpleQueue()
        self.closed = threading.Event()
        self.layout: pb.ModelLayout | None = None
        self.models: dict[int, wire.FloatVector] = {}
        self.assembler: tuple[int, wire.PayloadAssembler] | None = None
        self.cancelled: set[str] = set()
        self.heartbeat_seconds = 5.0
        self.max_chunk_bytes = wire.MAX_CHUNK_BYTES
        self.send(
            pb.LearnerMessage(
                hello=pb.Hello(
                    learner_id=learner_id,
                    token=token,
                    num_examples=num_examples,
                    capabilities=["train", "evaluate", "delta"],
                    client_version="metis-async",
                )
            )
        )

    def send(self, message: pb.LearnerMessage) -> None:
        if not self.closed.is_set():
            self.outbox.put(message)

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.outbox.put(None)

    def requests(self) -> Iterator[pb.LearnerMessage]:
        while (message := self.outbox.get()) is not None:
            yield message


class LearnerRunner:
    """Runs a `Learner` against a controller; `run_learner` is the one-call form.

    Args:
        address: controller address, host:port.
        learner: the user's learner.
        learner_id: stable identity; empty lets the controller assign one (reused on reconnect).
        token: credential when the controller checks tokens.
        backoff: reconnect policy.
        stop: set it from another thread to end the run after the current message.
    """

    def __init__(
        self,
        address: str,
        learner: Learner,
        *,
        learner_id: str = "",
        token: str = "",
        backoff: Backoff | None = None,
        stop: threading.Event | None = None,
        seed: int | None = None,
    ) -> None:
        self.address = address
        self.learner = learner
        self.token = token
        self.backoff = backoff or Backoff()
        self.stop = stop or threading.Event()
        self.summary = RunSummary(learner_id=learner_id)
        self._rng = random.Random(seed)
        self._payload_ids = itertools.count(1)
        limit = wire.MAX_CHUNK_BYTES + 1024 * 1024
        self._channel_options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def run(self) -> RunSummary:
        """Serve tasks until the controller shuts the federation down or `stop` is set."""
        failures = 0
        while not self.stop.is_set():
            try:
                welcomed = self._session()
            except grpc.RpcError as error:
                code = error.code()
                detail = error.details()
                self.summary.errors.append(f"{code.name}: {detail}")
                if code in FATAL_CODES:
                    raise LearnerStopped(f"controller refused this learner: {detail}") from None
                welcomed = False
                _log("stream_broken", code=code.name, detail=detail)
            else:
                if self.summary.shutdown_reason or self.stop.is_set():
                    break
                welcomed = True
            failures = 0 if welcomed else failures + 1
            if self.backoff.max_attempts is not None and failures >= self.backoff.max_attempts:
                raise LearnerStopped(
                    f"gave up after {failures} failed attempts to reach "
                    f"{self.address}: {self.summary.errors[-1:]}"
                )
            delay = self.backoff.delay(max(failures, 1), self._rng)
            _log("reconnecting", in_seconds=round(delay, 3), failures=failures)
            self.stop.wait(delay)
        return self.summary

    # ------------------------------------------------------------------------------ one session

    def _session(self) -> bool:
        """One stream from hello to its end; True if the controller welcomed us."""
        stream = _Stream(self.summary.learner_id, self.learner.num_examples(), self.token)
        tasks: queue.SimpleQueue[pb.ControllerMessage | None] = queue.SimpleQueue()
        welcomed = False
        with grpc.insecure_channel(self.address, options=self._channel_options) as channel:
            join = channel.stream_stream(
                JOIN_METHOD,
                request_serializer=pb.LearnerMessage.SerializeToString,
                response_deserializer=pb.ControllerMessage.FromString,
            )
            responses = join(stream.requests())
            worker = threading.Thread(target=self._work, args=(stream, tasks), daemon=True)
            beat = threading.Thread(target=self._heartbeat, args=(stream,), daemon=True)
            worker.start()
            try:
                for message in responses:
                    kind = message.WhichOneof("body")
                    if kind == "welcome":
                        welcomed = True
                        self._on_welcome(stream, message.welcome)
                        beat.start()
                    elif kind == "layout":
                        stream.layout = message.layout
                    elif kind == "model":
                        self._on_model(stream, message.model)
                    elif kind == "chunk":
                        self._on_chunk(stream, message.chunk)
                    elif kind in ("train", "evaluate"):
                        tasks.put(message)
                    elif kind == "cancel":
                        stream.cancelled.add(message.cancel.task_id)
                    elif kind == "error":
                        _log(
                            "controller_error",
                            task_id=message.error.task_id,
                            message=message.error.message,
                        )
                    elif kind == "shutdown":
                        self.summary.shutdown_reason = message.shutdown.reason or "shutdown"
                        _log("shutdown", reason=self.summary.shutdown_reason)
                        break
                    if self.stop.is_set():
                        break
            finally:
                tasks.put(None)
                stream.close()
                responses.cancel()
                worker.join(timeout=5.0)
        return welcomed

    def _on_welcome(self, stream: _Stream, welcome: pb.Welcome) -> None:
        self.summary.learner_id = welcome.learner_id
        self.summary.sessions += 1
        stream.heartbeat_seconds = welcome.heartbeat_interval_seconds or 5.0
        stream.max_chunk_bytes = welcome.max_chunk_bytes or wire.MAX_CHUNK_BYTES
        _log("welcomed", learner_id=welcome.learner_id, protocol=welcome.protocol)
        if welcome.need_initial_model:
            arrays = self.learner.get_parameters()
            layout = wire.make_layout(arrays)
            flat = wire.flatten(arrays, layout)
            header, chunks = wire.make_payload(
                flat,
                next(self._payload_ids),
                pb.PAYLOAD_KIND_WEIGHTS,
                layout.layout_id,
                stream.max_chunk_bytes,
            )
            stream.send(pb.LearnerMessage(layout=layout))
            stream.send(pb.LearnerMessage(initial_model=pb.InitialModel(payload=header)))
            for chunk in chunks:
                stream.send(pb.LearnerMessage(chunk=chunk))

    def _on_model(self, stream: _Stream, model: pb.Model) -> None:
        if stream.layout is None:
            raise wire.WireError("model arrived before its layout")
        assembler = wire.PayloadAssembler(
            model.payload,
            int(stream.layout.total_bytes),
            stream.layout.layout_id,
            wire.MAX_CHUNK_BYTES,
        )
        stream.assembler = (int(model.version), assembler)
        if assembler.done:  # an empty model has no chunks
            self._on_chunk(stream, None)

    def _on_chunk(self, stream: _Stream, chunk: pb.Chunk | None) -> None:
        if stream.assembler is None:
            raise wire.WireError("model chunk arrived with no model announced")
        version, assembler = stream.assembler
        if chunk is not None:
            assembler.add(chunk)
        if assembler.done:
            stream.models = {version: assembler.result()}  # keep only the newest version
            stream.assembler = None
            self.summary.last_version = version

    def _heartbeat(self, stream: _Stream) -> None:
        while not stream.closed.wait(stream.heartbeat_seconds):
            stream.send(pb.LearnerMessage(heartbeat=pb.Heartbeat(sent_unix_seconds=time.time())))

    # ------------------------------------------------------------------------------ tasks

    def _work(self, stream: _Stream, tasks: queue.SimpleQueue[pb.ControllerMessage | None]) -> None:
        while (message := tasks.get()) is not None:
            task = message.train if message.WhichOneof("body") == "train" else message.evaluate
            if task.task_id in stream.cancelled:
                continue
            base = stream.models.get(int(task.model_version))
            if base is None or stream.layout is None:
                self._fail(stream, task.task_id, f"model version {task.model_version} missing")
                continue
            try:
                if message.WhichOneof("body") == "train":
                    result, chunks = self._fit(stream, message.train, base, stream.layout)
                else:
                    result, chunks = self._evaluate(message.evaluate, base, stream.layout), []
            except Exception as error:  # the learner's own code failed: report, keep serving
                log.exception("task_failed task_id=%s", task.task_id)
                self._fail(stream, task.task_id, f"{type(error).__name__}: {error}")
                continue
            if task.task_id in stream.cancelled:
                continue  # the round closed while we trained: don't upload
            stream.send(pb.LearnerMessage(result=result))
            for chunk in chunks:
                stream.send(pb.LearnerMessage(chunk=chunk))
            self.summary.tasks_completed += 1

    def _fail(self, stream: _Stream, task_id: str, reason: str) -> None:
        self.summary.tasks_failed += 1
        stream.send(
            pb.LearnerMessage(
                error=pb.Error(code=pb.ERROR_CODE_TASK_FAILED, message=reason, task_id=task_id)
            )
        )

    def _fit(
        self, stream: _Stream, task: pb.TrainTask, base: wire.FloatVector, layout: pb.ModelLayout
    ) -> tuple[pb.TaskResult, list[pb.Chunk]]:
        c = task.config
        config = FitConfig(
            model_version=int(task.model_version),
            local_steps=c.local_steps,
            epochs=c.epochs,
            batch_size=c.batch_size or 32,
            learning_rate=c.learning_rate,
            proximal_mu=c.proximal_mu,
            extra=dict(c.extra),
            time_budget_seconds=c.time_budget_seconds,
        )
        params = [np.array(a) for a in wire.unflatten(base, layout)]
        started = time.perf_counter()
        trained, num_examples, metrics = self.learner.fit(params, config)
        seconds = time.perf_counter() - started
        new = wire.flatten(trained, layout)
        if task.upload_delta:
            np.subtract(new, base, out=new)
        kind = pb.PAYLOAD_KIND_DELTA if task.upload_delta else pb.PAYLOAD_KIND_WEIGHTS
        header, chunks = wire.make_payload(
            new, next(self._payload_ids), kind, layout.layout_id, stream.max_chunk_bytes
        )
        batches_per_epoch = max(1, -(-int(num_examples) // config.batch_size))
        steps = int(metrics.get("steps", c.local_steps or config.epochs * batches_per_epoch))
        per_batch = seconds / steps if steps else 0.0
        result = pb.TaskResult(
            task_id=task.task_id,
            base_version=task.model_version,
            payload=header,
            num_examples=int(num_examples),
            completed_steps=steps,
            metrics={k: float(v) for k, v in metrics.items()},
            train_seconds=seconds,
            seconds_per_batch=per_batch,
            seconds_per_epoch=per_batch * batches_per_epoch,
        )
        return result, list(chunks)

    def _evaluate(
        self, task: pb.EvaluateTask, base: wire.FloatVector, layout: pb.ModelLayout
    ) -> pb.TaskResult:
        params = [np.array(a) for a in wire.unflatten(base, layout)]
        config = EvaluateConfig(
            model_version=int(task.model_version), batch_size=task.batch_size or 256
        )
        loss, num_examples, metrics = self.learner.evaluate(params, config)
        values = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        return pb.TaskResult(
            task_id=task.task_id,
            base_version=task.model_version,
            num_examples=int(num_examples),
            metrics=values,
        )


def run_learner(
    address: str,
    learner: Learner,
    *,
    learner_id: str = "",
    token: str = "",
    backoff: Backoff | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
) -> RunSummary:
    """Connect `learner` to the controller at `address` and serve tasks until shutdown.

    Reconnects with jittered exponential backoff when the stream breaks; raises `LearnerStopped`
    on a fatal status (bad token) or after `backoff.max_attempts` consecutive failed attempts.
    """
    runner = LearnerRunner(
        address, learner, learner_id=learner_id, token=token, backoff=backoff, stop=stop, seed=seed
    )
    return runner.run()
