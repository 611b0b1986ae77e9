"""Updates folded where they arrived: the core's handle on an ingest worker's partial sum.

With ingest workers, an upload stays in the worker that received it. The core sees a
`RemoteUpdate` (its length and where it lies) and decides as always; accepting it tells the
worker to fold it into its partial sum for the open version with the weight the policy chose,
and rejecting it tells the worker to drop it. When the version commits, the core collects every
worker's partial (float64 sum, total weight, count) and merges it into its own accumulator:
sums add, so the merged aggregate is the one a single process would hold, up to the order of
float64 additions (`Accumulator.merge`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

Partial = tuple[npt.NDArray[np.float64], float, int]
"""A worker's partial sum: the float64 weighted sum, its total weight and update count."""


class PartialSums(Protocol):
    """What the core's process offers `ServerStep` to fold and collect remote updates.

    Every method is called on the core's thread.
    """

    def fold(self, worker: int, handle: int, weight: float, generation: int) -> None:
        """Tell `worker` to fold update `handle` with `weight` into partial `generation`."""
        ...

    def drop(self, worker: int, handle: int) -> None:
        """Tell `worker` to forget update `handle` (rejected or unanswered)."""
        ...

    def collect(self, workers: set[int], generation: int) -> dict[int, Partial | None]:
        """Each listed worker's partial sum of `generation` by worker (blocks; None for an empty
        one; a worker that died since is missing or reports fewer updates)."""
        ...

    def reset(self, workers: set[int], generation: int) -> None:
        """Tell the listed workers to drop their partial of `generation`."""
        ...


class RemoteUpdate:
    """An update held by ingest worker `worker` as `handle`, of `length` float32 values.

    Args:
        sums: the core process's side of the worker channels.
        worker: index of the worker holding it.
        handle: the worker's id for it.
        length: number of values.
    """

    __slots__ = ("handle", "length", "settled", "sums", "worker")

    def __init__(self, sums: PartialSums, worker: int, handle: int, length: int) -> None:
        self.sums = sums
        self.worker = worker
        self.handle = handle
        self.length = length
        self.settled = False

    def __len__(self) -> int:
        return self.length

    def fold(self, weight: float, generation: int) -> None:
        """Accepted: the worker folds it into partial `generation` with `weight`."""
        self.settled = True
        self.sums.fold(self.worker, self.handle, weight, generation)

    def release(self) -> None:
        """Not accepted: the worker drops it (no effect once folded)."""
        if not self.settled:
            self.settled = True
            self.sums.drop(self.worker, self.handle)
