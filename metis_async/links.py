"""How a stream server reaches the federation core: in this process, or in another one.

The stream side of the controller (`streams.StreamServer` and `ingest.Ingest`) never touches the
`FederationCore` directly; it goes through a `CoreLink`. `LocalLink` runs each event on the
core's thread in this process (`delivery.CoreRunner`). An ingest worker process uses
`workers.worker.HubLink`, which forwards the same events over its channel to the process that
runs the core. Either way events from one stream reach the core in the order they happened, and
the core's effects come back to the stream side as effect lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from metis_async import wire
from metis_async.delivery import CoreRunner
from metis_async.effects import FederationState
from metis_async.federation import FederationCore, TaskLookup, UpdateReport
from metis_async.v1 import controller_pb2 as pb

if TYPE_CHECKING:
    from metis_async._core import Segments


class CoreLink(Protocol):
    """The federation core as the stream side sees it (see the module docstring).

    Event methods return once the event is on its way in order (a local link: once the core
    has handled it); their effects arrive through the driver's effect delivery.
    """

    @property
    def run_id(self) -> str:
        """The run's id (prefix of task ids, told to learners in `Welcome`)."""
        ...

    @property
    def protocol(self) -> str:
        """The policy's name."""
        ...

    @property
    def ready(self) -> bool:
        """Whether the federation has a model."""
        ...

    @property
    def provider(self) -> str | None:
        """The learner asked for the initial model, if one is being waited for."""
        ...

    @property
    def federation_status(self) -> tuple[FederationState | None, int, int]:
        """(state, learners connected, learners needed) for a new learner's Welcome."""
        ...

    async def lookup(self, learner_id: str, task_id: str) -> TaskLookup:
        """Whether `task_id` is outstanding for `learner_id`, closed (and why), committed,
        resendable, or unknown (`FederationCore.lookup`)."""
        ...

    def learner_joined(
        self,
        learner_id: str,
        session_id: str,
        num_examples: int,
        capabilities: frozenset[str],
        held: tuple[str, int, int] | None,
    ) -> asyncio.Future[None]:
        """A session said hello (after the checks); `held` is its claim of a model it holds.
        Sent at once, so it stays in order with the session's loss; the result is done once
        the core has taken it (the stream writes its Welcome meanwhile)."""
        ...

    async def learner_lost(self, learner_id: str, session_id: str, reason: str) -> None:
        """Session `session_id` of `learner_id` ended."""
        ...

    async def learners_heard(self, ages: Mapping[str, float]) -> None:
        """When each of these learners' streams last had a message, heartbeats included
        (seconds ago): the "last seen" people are shown."""
        ...

    async def update_arrived(
        self, learner_id: str, report: UpdateReport, update: wire.FloatVector | Segments | bytes
    ) -> None:
        """A complete training upload, every value checked."""
        ...

    async def evaluation_arrived(
        self, learner_id: str, task_id: str, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        """An evaluation result."""
        ...

    async def task_failed(self, learner_id: str, task_id: str, reason: str) -> None:
        """The learner reported that it could not run `task_id`."""
        ...

    async def secure_step_arrived(self, learner_id: str, step: pb.SecAggStep) -> None:
        """A learner's step of a SecAgg+ round."""
        ...

    async def initial_model_refused(self, learner_id: str, reason: str) -> None:
        """The learner asked for the first model cannot (or sent a refused one)."""
        ...

    async def initialize_model(
        self, layout: pb.ModelLayout, flat: wire.FloatVector, source: str
    ) -> None:
        """A learner's initial model arrived, every value checked."""
        ...


class LocalLink:
    """A `CoreLink` to a core running on a `CoreRunner` thread of this process.

    Args:
        core: the federation core.
        runner: runs core calls on the core's thread and delivers their effects.
        now: the federation's clock (seconds).
    """

    def __init__(self, core: FederationCore, runner: CoreRunner, now: Callable[[], float]) -> None:
        self.core = core
        self._runner = runner
        self._now = now

    @property
    def run_id(self) -> str:
        return self.core.run_id

    @property
    def protocol(self) -> str:
        return self.core.policy.name

    @property
    def ready(self) -> bool:
        return self.core.ready

    @property
    def provider(self) -> str | None:
        return self.core.provider

    @property
    def federation_status(self) -> tuple[FederationState | None, int, int]:
        return self.core.status_now()  # attribute reads: safe beside the core thread

    async def lookup(self, learner_id: str, task_id: str) -> TaskLookup:
        return self.core.lookup(learner_id, task_id)  # dict reads: safe beside the core thread

    def learner_joined(
        self,
        learner_id: str,
        session_id: str,
        num_examples: int,
        capabilities: frozenset[str],
        held: tuple[str, int, int] | None,
    ) -> asyncio.Future[None]:
        core = self.core
        now = self._now()
        return self._runner.submit_batched(
            core.learner_joined, now, learner_id, num_examples, capabilities, held
        )

    async def learner_lost(self, learner_id: str, session_id: str, reason: str) -> None:
        # batched like joins, so a learner's loss never overtakes its join
        await self._runner.call_batched(self.core.learner_lost, self._now(), learner_id, reason)

    async def learners_heard(self, ages: Mapping[str, float]) -> None:
        await self._call(self.core.learners_heard, ages)

    async def update_arrived(
        self, learner_id: str, report: UpdateReport, update: wire.FloatVector | Segments | bytes
    ) -> None:
        await self._call(self.core.update_arrived, learner_id, report, update)

    async def evaluation_arrived(
        self, learner_id: str, task_id: str, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        core = self.core
        await self._call(core.evaluation_arrived, learner_id, task_id, num_examples, metrics)

    async def task_failed(self, learner_id: str, task_id: str, reason: str) -> None:
        await self._call(self.core.task_failed, learner_id, task_id, reason)

    async def secure_step_arrived(self, learner_id: str, step: pb.SecAggStep) -> None:
        await self._call(self.core.secure_step_arrived, learner_id, step)

    async def initial_model_refused(self, learner_id: str, reason: str) -> None:
        await self._call(self.core.initial_model_refused, learner_id, reason)

    async def initialize_model(
        self, layout: pb.ModelLayout, flat: wire.FloatVector, source: str
    ) -> None:
        if not self.core.ready:
            await self._call(self.core.initialize_model, layout, flat, source)

    async def _call(self, method: Callable[..., object], *args: object) -> None:
        # Batched like joins: the uploads that complete in one loop iteration reach the core in
        # one hop, not a thread switch (and two loop wake-ups) each, and every learner event
        # stays in the order the streams produced it.
        await self._runner.call_batched(method, self._now(), *args)  # type: ignore[arg-type]
