"""Staleness functions: how much an update trained from an old version still counts.

Staleness τ is the number of versions committed between the version a learner trained from and
the version its update is applied to, counted exactly from the version tag on the update. Each
function maps τ ≥ 0 to a weight in (0, 1] with s(0) = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

StalenessKind = Literal["constant", "polynomial", "hinge", "inverse_sqrt"]

DEFAULT_A: dict[str, float] = {"polynomial": 0.5, "hinge": 10.0}
"""The default `a` per kind (FedAsync: polynomial a = 0.5, hinge a = 10, b = 4)."""


@dataclass(frozen=True)
class StalenessFunction:
    """A staleness weighting s(τ).

    Attributes:
        kind: `constant` s = 1; `polynomial` s = (τ + 1)^-a (FedAsync); `hinge` s = 1 for τ <= b,
            else 1 / (a (τ - b) + 1) (FedAsync); `inverse_sqrt` s = 1 / sqrt(1 + τ) (FedBuff).
        a: exponent (polynomial) or slope (hinge); None takes the kind's default, the
            FedAsync paper's: 10 for hinge, 0.5 otherwise. Always a float after construction.
        b: hinge point in versions.
    """

    kind: StalenessKind = "polynomial"
    a: float | None = None
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.a is None:  # one default per kind, whichever way the function is spelled
            object.__setattr__(self, "a", DEFAULT_A.get(self.kind, 0.5))
        if self.kind not in ("constant", "polynomial", "hinge", "inverse_sqrt"):
            raise ValueError(
                f"staleness kind must be constant, polynomial, hinge or inverse_sqrt, "
                f"got {self.kind!r}"
            )
        a = self.slope
        if a < 0 or not math.isfinite(a):
            raise ValueError(f"staleness a must be finite and >= 0, got {a}")
        if self.b < 0 or not math.isfinite(self.b):
            raise ValueError(f"staleness b must be finite and >= 0, got {self.b}")

    @property
    def slope(self) -> float:
        """`a` as a float (the exponent or the hinge slope)."""
        return 0.5 if self.a is None else float(self.a)

    def __call__(self, staleness: int) -> float:
        """Weight of an update `staleness` versions old."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((staleness + 1) ** -self.slope)
        if self.kind == "hinge":
            return 1.0 if staleness <= self.b else 1.0 / (self.slope * (staleness - self.b) + 1.0)
        return 1.0 / math.sqrt(1.0 + staleness)

    @classmethod
    def parse(cls, text: str) -> StalenessFunction:
        """Build from `kind[:a[:b]]`, e.g. `polynomial:0.5`, `hinge:10:4`, `constant`."""
        kind, *numbers = text.split(":")
        values = [float(n) for n in numbers]
        a = values[0] if values else None
        b = values[1] if len(values) > 1 else 4.0
        return cls(kind, a, b)  # type: ignore[arg-type]
