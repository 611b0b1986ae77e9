"""The learner's task worker: runs `fit` and `evaluate` one task at a time, uploads the results.

It runs in its own thread, so the reader keeps receiving cancellations and models while the
learner trains. Failures of the learner's own code are reported to the controller (Error
TASK_FAILED) and the worker keeps serving.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator

import numpy as np

from metis_async import codecs, wire
from metis_async.client.learner import EvaluateConfig, FitConfig, Learner
from metis_async.client.models import HeldModel
from metis_async.client.stream import LearnerStream
from metis_async.client.summary import RunSummary
from metis_async.client.unacked import UnackedUpdates
from metis_async.v1 import controller_pb2 as pb

log = logging.getLogger("metis_async.client")

MODEL_WAIT_SECONDS = 60.0
"""How long a task without a deadline waits for its model's decryption shares (seconds)."""


class TaskWorker:
    """Runs the tasks of a session with the model the session holds.

    Args:
        learner: the user's learner.
        summary: counters to update (tasks completed and failed).
        payload_ids: the runner's source of payload ids (unique per stream; never reused, so a
            kept update can be resent as it was on a later stream).
        unacked: where train results wait for the controller's acknowledgement.
    """

    def __init__(
        self,
        learner: Learner,
        summary: RunSummary,
        payload_ids: Iterator[int],
        unacked: UnackedUpdates | None = None,
    ) -> None:
        self.learner = learner
        self.summary = summary
        self._payload_ids = payload_ids
        self.unacked = unacked if unacked is not None else UnackedUpdates()

    def run(
        self, stream: LearnerStream, tasks: queue.SimpleQueue[pb.ControllerMessage | None]
    ) -> None:
        """Serve `tasks` until a None arrives (the session ended)."""
        while (message := tasks.get()) is not None:
            task = message.train if message.WhichOneof("body") == "train" else message.evaluate
            if task.task_id in stream.cancelled:
                continue
            # under multiparty keys the model completes when the committee's shares arrive
            wait = task.deadline_seconds if isinstance(task, pb.TrainTask) else 0.0
            model = stream.models.model_for(task.model_version, wait or MODEL_WAIT_SECONDS)
            if model is None or model.version != task.model_version:
                self._fail(stream, task.task_id, f"model version {task.model_version} missing")
                continue
            try:
                if message.WhichOneof("body") == "train":
                    result, chunks = self._fit(stream, message.train, model)
                else:
                    result, chunks = self._evaluate(message.evaluate, model), []
            except Exception as error:  # the learner's own code failed: report, keep serving
                log.exception("task_failed task_id=%s", task.task_id)
                self._fail(stream, task.task_id, f"{type(error).__name__}: {error}")
                continue
            if task.task_id in stream.cancelled:
                continue  # the round closed while we trained: don't upload
            if chunks:  # a train result: kept until the controller acknowledges it
                self.unacked.keep(stream.models.run_id, result, chunks)
            grant = message.WhichOneof("body") == "train" and message.train.upload_grant
            send_result(stream, result, chunks, wait_for_grant=bool(grant and chunks))
            self.summary.tasks_completed += 1

    def _fail(self, stream: LearnerStream, task_id: str, reason: str) -> None:
        self.summary.tasks_failed += 1
        stream.send(
            pb.LearnerMessage(
                error=pb.Error(code=pb.ERROR_CODE_TASK_FAILED, message=reason, task_id=task_id)
            )
        )

    def _fit(
        self, stream: LearnerStream, task: pb.TrainTask, model: HeldModel
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
        started = time.perf_counter()
        trained, num_examples, metrics = self.learner.fit(model.parameters(), config)
        seconds = time.perf_counter() - started
        new = wire.flatten(trained, model.layout)
        if task.upload_delta:
            np.subtract(new, model.flat, out=new)
        kind = pb.PAYLOAD_KIND_DELTA if task.upload_delta else pb.PAYLOAD_KIND_WEIGHTS
        header, chunks = self._upload(stream, new, kind, model.layout.layout_id)
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

    def _upload(
        self, stream: LearnerStream, flat: wire.FloatVector, kind: int, layout_id: int
    ) -> tuple[pb.Payload, list[pb.Chunk]]:
        """The upload in the session's upload dtype, or float32 when a value does not fit it
        (the controller always accepts float32)."""
        payload_id = next(self._payload_ids)
        limit = stream.models.max_chunk_bytes
        encryption = stream.models.encryption
        if stream.models.encrypted and encryption is not None:
            return encryption.encrypt_payload(flat, payload_id, layout_id, limit, kind)
        if stream.masked:
            return stream.secagg.mask(flat, payload_id, layout_id, limit)
        dtype = stream.models.upload_dtype
        if dtype != pb.DTYPE_FLOAT32:
            try:
                return wire.encode_payload(flat, payload_id, kind, layout_id, limit, dtype)
            except codecs.CodecError as error:
                log.warning("upload_codec_fallback dtype=%s reason=%s", dtype, error)
        header, chunks = wire.make_payload(flat, payload_id, kind, layout_id, limit)
        return header, list(chunks)

    def _evaluate(self, task: pb.EvaluateTask, model: HeldModel) -> pb.TaskResult:
        # batch_size 0: the learner's choice (EvaluateConfig's default)
        config = EvaluateConfig(
            model_version=int(task.model_version), batch_size=task.batch_size or 256
        )
        loss, num_examples, metrics = self.learner.evaluate(model.parameters(), config)
        values = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        return pb.TaskResult(
            task_id=task.task_id,
            base_version=task.model_version,
            num_examples=int(num_examples),
            metrics=values,
        )


def send_result(
    stream: LearnerStream,
    result: pb.TaskResult,
    chunks: list[pb.Chunk],
    wait_for_grant: bool = False,
) -> None:
    """A result header and its chunks, in order; with `wait_for_grant` (TrainTask.upload_grant)
    the chunks go only once the controller grants them (see UPLOAD GRANTS in the proto)."""
    if wait_for_grant:
        stream.expect_grant(result.task_id)
    stream.send(pb.LearnerMessage(result=result))
    if wait_for_grant and not stream.wait_for_grant(result.task_id):
        return  # refused (stale, duplicate, already counted) or the stream ended
    for chunk in chunks:
        stream.send(pb.LearnerMessage(chunk=chunk))
