"""Byzantine-robust aggregation rules, in Rust: median, trimmed mean, Krum, Multi-Krum, clipping.

Unlike the streaming :class:`~metis_async.aggregation.Accumulator` (memory O(model)), these rules
need every update of a round at once: ``n × d × 4`` bytes for ``n`` float32 updates of ``d``
parameters (20 updates of 10M parameters: 800 MB), plus the float32 result. They suit synchronous
rounds and FedBuff with a large enough buffer, not FedAsync. Without an attack they cost 1–3
accuracy points under non-IID data, so do not make them the default.

The rules are unweighted: every update counts once (``ServerStep`` multiplies the updates by
their weights first only for an unnormalized, FedBuff-style commit). The trimmed mean drops
``⌊beta·n⌋`` values at each end, none at all when ``beta·n < 1``.
``metis_async.aggregation.compatibility.check_compatible`` refuses a rule a protocol cannot
commit with (Krum / Multi-Krum below ``2f + 3`` updates, any rule under FedAsync) and warns
about the other two cases when the settings are made.

Every function takes ``updates`` as a list of 1-D arrays or a 2-D array with one update per row.
Float32 C-contiguous inputs are borrowed by Rust without copying; anything else (float64, a
strided view, another float dtype) is first converted to a float32 copy, which costs another
``4 × d`` bytes per converted update. Work runs in parallel with the GIL released. Invalid input
(no updates, ragged lengths, NaN or infinity, bad ``beta``/``f``/``m``/``max_norm``) raises
:class:`AggregationError`, a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from metis_async import _core
from metis_async._core import AggregationError

__all__ = [
    "AggregationError",
    "clip_by_norm",
    "coordinate_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "trimmed_mean",
]

Updates = Sequence[NDArray[np.floating]] | NDArray[np.floating]
"""A round's updates: a sequence of 1-D arrays or a 2-D array with one update per row."""

_FLOAT32 = np.dtype(np.float32)


def coordinate_median(updates: Updates) -> NDArray[np.float32]:
    """The per-coordinate median of the updates, as float32.

    For an even number of updates, the mean of the two middle values (as ``numpy.median``).
    Tolerates up to half the updates being arbitrary. O(n·d) with selection.
    """
    return _core.coordinate_median(_float32(updates))


def trimmed_mean(updates: Updates, beta: float) -> NDArray[np.float32]:
    """Per coordinate, the mean after dropping the ``⌊beta·n⌋`` largest and smallest values.

    Args:
        updates: the round's ``n`` updates.
        beta: fraction trimmed from each end, ``0 <= beta < 0.5`` (0 is the plain mean). To
            tolerate ``f`` Byzantine updates choose ``beta >= f/n``.
    """
    return _core.trimmed_mean(_float32(updates), beta)


def krum_scores(updates: Updates, f: int) -> NDArray[np.float64]:
    """Krum scores: for each update, the summed squared distances to its ``n − f − 2`` nearest
    other updates. Needs ``n >= 2f + 3``; costs O(n²·d) (all pairwise distances)."""
    return _core.krum_scores(_float32(updates), f)


def krum(updates: Updates, f: int) -> int:
    """Krum (Blanchard et al. 2017): the index of the update with the lowest score, tolerating
    ``f`` Byzantine updates out of ``n >= 2f + 3``."""
    return _core.krum(_float32(updates), f)


def multi_krum(updates: Updates, f: int, m: int | None = None) -> NDArray[np.float32]:
    """Multi-Krum: the mean of the ``m`` updates with the lowest Krum scores.

    Args:
        updates: the round's ``n >= 2f + 3`` updates.
        f: number of Byzantine updates to tolerate.
        m: how many updates to average, ``1 <= m <= n``; defaults to ``n − f``.
    """
    return _core.multi_krum(_float32(updates), f, m)


def clip_by_norm(update: NDArray[np.floating], max_norm: float) -> NDArray[np.float32]:
    """A new float32 array ``update·min(1, max_norm/‖update‖)`` (Euclidean norm).

    Bounds each learner's influence before averaging; ``max_norm`` must be finite and > 0.
    """
    return _core.clip_by_norm(_vector(update), max_norm)


def _float32(updates: Updates) -> NDArray[np.float32] | list[NDArray[np.float32]]:
    """``updates`` as the core takes them, copying only what it cannot borrow."""
    if isinstance(updates, np.ndarray):
        if updates.ndim != 2:
            raise AggregationError(f"expected a 2-D stack of updates, got {updates.ndim}-D")
        return np.ascontiguousarray(updates, dtype=np.float32)
    return [_vector(update) for update in updates]


def _vector(update: NDArray[np.floating]) -> NDArray[np.float32]:
    array = np.asarray(update)
    if not np.issubdtype(array.dtype, np.floating):
        raise AggregationError(f"expected a floating-point array, got {array.dtype}")
    if array.dtype == _FLOAT32 and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array, dtype=np.float32)
