"""The core runner: learner events reach the core thread in batches, in order, each with its
own result."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from metis_async.delivery import CoreRunner
from metis_async.links import LocalLink


class _Core:
    """Records the events it gets, and on which thread; each returns one marker effect."""

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def next_wakeup(self) -> float | None:
        return None

    def update_arrived(self, now: float, learner_id: str, report: Any, update: Any) -> list[Any]:
        self.threads.add(threading.get_ident())
        if learner_id == "bad":
            raise ValueError("refused by the core")
        return [learner_id]


def _uploads(learners: list[str]) -> tuple[list[list[Any]], list[BaseException | None]]:
    async def scenario() -> tuple[list[list[Any]], list[BaseException | None]]:
        batches: list[list[Any]] = []
        core = _Core()
        runner = CoreRunner(core, batches.append, lambda _wakeup: None)  # type: ignore[arg-type]
        link = LocalLink(core, runner, asyncio.get_running_loop().time)  # type: ignore[arg-type]
        try:
            results = await asyncio.gather(
                *(link.update_arrived(lid, None, b"") for lid in learners),  # type: ignore[arg-type]
                return_exceptions=True,
            )
        finally:
            runner.close()
        assert len(core.threads) == 1  # the core's own thread
        assert threading.get_ident() not in core.threads
        return batches, [r if isinstance(r, BaseException) else None for r in results]

    return asyncio.run(scenario())


def test_uploads_of_one_loop_iteration_reach_the_core_in_one_batch_in_order() -> None:
    batches, errors = _uploads([f"learner-{i}" for i in range(50)])
    assert batches == [[f"learner-{i}" for i in range(50)]]
    assert errors == [None] * 50


def test_a_refused_upload_fails_alone() -> None:
    batches, errors = _uploads(["a", "bad", "b"])
    assert batches == [["a", "b"]]
    assert errors[0] is None
    assert errors[2] is None
    assert isinstance(errors[1], ValueError)
    assert str(errors[1]) == "refused by the core"
