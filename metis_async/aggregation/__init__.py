"""Aggregation: the Python face of the Rust core (``metis_async._core``).

- :class:`Accumulator` folds updates into a float64 running sum as they arrive (memory O(model)),
  thread-safe and GIL-free for the O(model) work, so the server calls it via
  ``asyncio.to_thread``.
- :func:`weighted_average` averages updates that are all in memory at once, reading each once.
- :class:`AggregationError` (a ``ValueError``) reports any invalid input; it is raised before any
  state changes.

Arrays are 1-D (a flat model). :class:`Accumulator` borrows them without copying and therefore
requires float32 or float64, C-contiguous; :func:`weighted_average` here is lenient and converts
only what the core cannot take as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from metis_async._core import Accumulator, AggregationError
from metis_async._core import weighted_average as _weighted_average

__all__ = ["Accumulator", "AggregationError", "weighted_average"]

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)

Update = NDArray[np.floating]
"""A flat model update: a 1-D array of any floating dtype."""


def weighted_average(
    updates: Sequence[Update] | Update, weights: Sequence[float] | NDArray[np.floating]
) -> NDArray[np.float32]:
    """Weighted mean ``Σ wᵢ·xᵢ / Σ wᵢ`` of equally long updates, as float32.

    Args:
        updates: a sequence of 1-D arrays, or a 2-D array with one update per row. Float32 and
            float64 C-contiguous arrays are passed to Rust without copying. Other floating dtypes
            and non-contiguous arrays are copied first (to float64 from 64-bit or wider floats,
            else to float32); if float32 and float64 updates are mixed, all become float32.
        weights: one finite weight > 0 per update (for FedAvg, the number of examples).

    Sums in float64 with the GIL released. Needs every update in memory at once; to fold updates
    as they arrive, use :class:`Accumulator`.

    Raises:
        AggregationError: no updates, mismatched counts or lengths, a bad weight, a non-finite
            value, or a non-floating dtype.
    """
    if isinstance(updates, np.ndarray):
        if updates.ndim != 2:
            raise AggregationError(f"expected a 2-D stack of updates, got {updates.ndim}-D")
        arrays: list[Update] = list(_native(updates))
    else:
        arrays = [_native(np.asarray(update)) for update in updates]
    if len({array.dtype for array in arrays}) > 1:
        arrays = [array.astype(np.float32, copy=False) for array in arrays]
    return _weighted_average(arrays, [float(w) for w in weights])


def _native(array: Update) -> Update:
    """``array`` itself when Rust can borrow it, else a C-contiguous float32/float64 copy."""
    if array.dtype in (_FLOAT32, _FLOAT64) and array.flags.c_contiguous:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise AggregationError(f"expected a floating-point array, got {array.dtype}")
    # 64-bit and wider floats keep float64 precision; narrower ones become the model's float32.
    target = _FLOAT64 if array.dtype.itemsize >= 8 else _FLOAT32
    return np.ascontiguousarray(array, dtype=target)
