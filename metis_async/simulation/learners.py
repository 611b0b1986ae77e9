"""A simulated learner: a real `Learner` with a simulated speed and a queue of tasks.

It behaves like the learner client (`metis_async.client.runner`): tasks run one at a time in
arrival order; a cancelled task that has not started is skipped, and a running one finishes (the
client cannot interrupt `fit`) but its result is dropped. A training task takes the step time ×
the steps it runs; a time budget cuts the steps to those that fit. Evaluation takes no time beyond
the per-task latency.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from metis_async import wire
from metis_async.client.learner import EvaluateConfig, FitConfig, Learner
from metis_async.protocols import EvaluationArrived, Task, TaskKind, UpdateArrived
from metis_async.simulation.speeds import LearnerSpeed
from metis_async.v1 import controller_pb2 as pb


@dataclass
class Job:
    """A task handed to a simulated learner.

    Attributes:
        task: the task as the policy made it.
        base: the flat model of the version the task names (never modified).
        steps: local steps it runs, fixed when it starts (training tasks).
        cancelled: the policy cancelled it; its result is never delivered.
    """

    task: Task
    base: wire.FloatVector
    steps: int = 0
    cancelled: bool = False


@dataclass
class SimulatedLearner:
    """One learner of a simulated federation.

    Attributes:
        learner_id: its id in events and tasks.
        learner: the code that trains and evaluates.
        speed: its simulated speed.
        num_examples: training examples it holds.
        online: whether it is connected.
        generation: bumped on every disconnect, so that occurrences scheduled before are void.
        queue: tasks waiting to start.
        running: the task in progress, if any.
    """

    learner_id: str
    learner: Learner
    speed: LearnerSpeed
    num_examples: int
    online: bool = False
    generation: int = 0
    queue: deque[Job] = field(default_factory=deque)
    running: Job | None = None

    def start_next(self, latency_seconds: float) -> float | None:
        """Start the next task that was not cancelled, if idle; returns its duration (seconds)."""
        while self.running is None and self.queue:
            job = self.queue.popleft()
            if job.cancelled:
                continue
            self.running = job
            if job.task.kind is not TaskKind.TRAIN:
                return latency_seconds
            job.steps = self._planned_steps(job.task)
            return latency_seconds + job.steps * self.speed.step_seconds
        return None

    def disconnect(self) -> list[Job]:
        """Go offline; returns the tasks that are void (queued and running)."""
        void = [*self.queue, *([self.running] if self.running is not None else [])]
        self.online = False
        self.generation += 1
        self.queue.clear()
        self.running = None
        return void

    def _batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(max(self.num_examples, 1) / max(batch_size, 1))

    def _planned_steps(self, task: Task) -> int:
        """Local steps the task asks for, cut to those that fit its time budget."""
        settings = task.settings
        assert settings is not None, "a training task carries its settings"
        steps = settings.local_steps or settings.epochs * self._batches_per_epoch(
            settings.batch_size
        )
        if task.time_budget_seconds > 0:
            fit = math.floor(task.time_budget_seconds / self.speed.step_seconds)
            steps = min(steps, max(1, fit))
        return max(steps, 1)

    def train(
        self, job: Job, now: float, layout: pb.ModelLayout
    ) -> tuple[UpdateArrived, wire.FloatVector]:
        """Run `job` for real; returns the event reporting it and the upload (delta or weights)."""
        task, settings = job.task, job.task.settings
        assert settings is not None
        config = FitConfig(
            model_version=task.version,
            local_steps=job.steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            proximal_mu=settings.proximal_mu,
            extra=dict(settings.extra),
        )
        params = [np.array(a) for a in wire.unflatten(job.base, layout)]
        trained, num_examples, metrics = self.learner.fit(params, config)
        upload = wire.flatten(trained, layout)
        if task.upload_delta:
            np.subtract(upload, job.base, out=upload)
        steps = int(metrics.get("steps", job.steps))
        per_batch = self.speed.step_seconds
        event = UpdateArrived(
            now=now,
            learner_id=self.learner_id,
            task_id=task.task_id,
            base_version=task.version,
            num_examples=int(num_examples),
            completed_steps=steps,
            train_seconds=steps * per_batch,
            metrics={k: float(v) for k, v in metrics.items()},
            seconds_per_batch=per_batch,
            seconds_per_epoch=per_batch * self._batches_per_epoch(settings.batch_size),
        )
        return event, upload

    def evaluate(self, job: Job, now: float, layout: pb.ModelLayout) -> EvaluationArrived:
        """Score the task's model on the local data; returns the event reporting it."""
        params = [np.array(a) for a in wire.unflatten(job.base, layout)]
        loss, num_examples, metrics = self.learner.evaluate(
            params, EvaluateConfig(model_version=job.task.version)
        )
        values = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        task = job.task
        return EvaluationArrived(
            now, self.learner_id, task.task_id, task.version, int(num_examples), values
        )
