"""An ingest worker's partial sums, one kind per aggregate (`partials.PartialKind`).

A worker folds the updates the core accepted into the open version's partial sum and, at the
commit, exports it as bytes with its total weight and count; the core merges the partials
(`partials.RemoteFolds`). Every method runs on the worker's single fold thread, in the order
the core asked, so the Rust calls release the GIL without racing each other.

- `FloatSum`: float32 updates into a float64 weighted sum (`_core.Accumulator`).
- `CipherSum`: BFV ciphertexts (bytes, as uploaded) times integer weights, no key
  (`_core.CipherSum`); exported as the ciphertexts one after the other.
- `MaskedSum`: SecAgg+ masked updates (uint32 little-endian) added mod 2^32; the weight is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from metis_async.workers.partials import PartialKind

if TYPE_CHECKING:
    from metis_async.secure.aggregate import HomomorphicAggregation


class PartialSum(Protocol):
    """One open version's partial sum in a worker."""

    def add_many(self, updates: Sequence[object], weights: Sequence[float]) -> None:
        """Fold `updates` with `weights` (already checked by the ingest)."""
        ...

    def export(self) -> tuple[bytes | memoryview, float, int]:
        """The sum's bytes, total weight and count."""
        ...

    def reset(self) -> None:
        """Empty the sum."""
        ...


class FloatSum:
    """Float32 updates into a float64 weighted sum (`length` values)."""

    def __init__(self, length: int) -> None:
        from metis_async._core import Accumulator

        self._acc = Accumulator(length)

    def add_many(self, updates: Sequence[object], weights: Sequence[float]) -> None:
        self._acc.add_many(updates, list(weights), False)  # type: ignore[arg-type]

    def export(self) -> tuple[bytes | memoryview, float, int]:
        total, weight, count = self._acc.export()
        return total.data, float(weight), int(count)

    def reset(self) -> None:
        self._acc.reset()


class CipherSum:
    """Ciphertext uploads times their integer weights, summed without a key."""

    def __init__(self, he: HomomorphicAggregation) -> None:
        self._size = he.settings.ciphertext_bytes
        self._sum = he.settings.context().sum()

    def add_many(self, updates: Sequence[object], weights: Sequence[float]) -> None:
        from metis_async.secure.aggregate import split_ciphertexts

        for update, weight in zip(updates, weights, strict=True):
            assert isinstance(update, bytes)
            self._sum.add(split_ciphertexts(update, self._size), int(weight))

    def export(self) -> tuple[bytes | memoryview, float, int]:
        body = b"".join(self._sum.ciphertexts())
        return body, float(self._sum.total_weight), int(self._sum.count)

    def reset(self) -> None:
        self._sum.reset()


class MaskedSum:
    """Masked updates (uint32) added mod 2^32."""

    def __init__(self, length: int) -> None:
        self._total = np.zeros(length, dtype="<u4")
        self._count = 0

    def add_many(self, updates: Sequence[object], weights: Sequence[float]) -> None:
        del weights  # every survivor counts once
        for update in updates:
            assert isinstance(update, bytes)
            np.add(self._total, np.frombuffer(update, dtype="<u4"), out=self._total)
            self._count += 1

    def export(self) -> tuple[bytes | memoryview, float, int]:
        return self._total.data, float(self._count), self._count

    def reset(self) -> None:
        self._total[:] = 0
        self._count = 0


def partial_kind(he: HomomorphicAggregation | None, secagg: bool) -> PartialKind:
    """The kind of partial sums a federation's workers keep."""
    if he is not None:
        return "cipher"
    return "masked" if secagg else "float"


def new_partial(
    kind: PartialKind, first: object, he: HomomorphicAggregation | None = None
) -> PartialSum:
    """An empty partial sum of `kind` for updates like `first` (its length sizes it)."""
    if kind == "cipher":
        assert he is not None
        return CipherSum(he)
    if kind == "masked":
        assert isinstance(first, bytes)
        return MaskedSum(len(first) // 4)
    return FloatSum(len(first))  # type: ignore[arg-type]
