"""Updates folded where they arrived: the core's handle on an ingest worker's partial sum.

With ingest workers, an upload stays in the worker that received it. The core sees a
`RemoteUpdate` (its length and where it lies) and decides as always; accepting it tells the
worker to fold it into its partial sum for the open version with the weight the policy chose,
and rejecting it tells the worker to drop it. When the version commits, the core collects every
worker's partial (its sum's bytes, total weight, count) and merges it into its own aggregate:
sums add, so the merged aggregate is the one a single process would hold.

What a partial sum is depends on the aggregate (`PartialKind`): a float64 weighted sum
(`Accumulator.merge`: equal up to the order of float64 additions), a keyless sum of BFV
ciphertexts with integer weights (homomorphic rounds: exact), or a sum of masked values mod 2^32
(SecAgg+: exact). `RemoteFolds` is the core's bookkeeping for all three.
"""

from __future__ import annotations

from typing import Literal, Protocol

PartialKind = Literal["float", "cipher", "masked"]
"""What a worker's partial sums are: float64 weighted sums, ciphertext sums or masked sums."""

Partial = tuple[bytes, float, int]
"""A worker's partial sum: its bytes (float64 values, ciphertexts one after the other, or uint32
values), its total weight and its update count."""


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


class RemoteFolds:
    """The open version's updates that ingest workers fold into their partial sums: how much
    weight each worker holds, and the collection at commit.

    Used by each aggregate (`ServerStep`, `HomomorphicStep`, `MaskedStep`) for its
    `RemoteUpdate`s; every method runs on the core's thread.
    """

    def __init__(self) -> None:
        self._generation = 0
        self._remote: dict[int, tuple[float, int]] = {}  # worker -> (weight, count) folded there
        self._sums: PartialSums | None = None  # where the remote updates came through
        # Workers whose partial of the last commit was lost (the core un-counts their updates).
        self.lost_workers: set[int] = set()

    @property
    def count(self) -> int:
        """Updates folded in workers since the last collection or reset."""
        return sum(c for _, c in self._remote.values())

    @property
    def total_weight(self) -> float:
        """Their total weight."""
        return sum(w for w, _ in self._remote.values())

    def add(self, update: RemoteUpdate, weight: float) -> None:
        """Accept `update` with `weight`: its worker folds it into its open partial."""
        self._sums = update.sums
        update.fold(weight, self._generation)
        folded, count = self._remote.get(update.worker, (0.0, 0))
        self._remote[update.worker] = (folded + weight, count + 1)

    def collect(self) -> list[Partial]:
        """The workers' complete partial sums of the open version (blocks on the workers).

        A worker that died with (part of) its partial, or did not answer in time, is added to
        `lost_workers`: none of its updates of this version is counted, so a learner's resend
        of any of them is counted once, later.
        """
        self.lost_workers = set()
        if not self._remote:
            return []
        sums = self._sums
        assert sums is not None
        remote, self._remote = self._remote, {}
        partials = sums.collect(set(remote), self._generation)
        self._generation += 1
        complete: list[Partial] = []
        for worker, (_, count) in remote.items():
            partial = partials.get(worker)
            if partial is not None and partial[2] == count:
                complete.append(partial)
            else:
                self.lost_workers.add(worker)
        if self.lost_workers:
            from structlog import get_logger

            get_logger("metis_async.aggregation").warning(
                "partial_sums_lost",
                updates_expected=sum(c for _, c in remote.values()),
                updates_merged=sum(p[2] for p in complete),
                weight_expected=sum(w for w, _ in remote.values()),
                workers=sorted(self.lost_workers),
            )
        return complete

    def reset(self) -> None:
        """Drop the open partials (the workers drop theirs)."""
        if self._remote and self._sums is not None:
            self._sums.reset(set(self._remote), self._generation)
        self._remote = {}
        self._generation += 1
