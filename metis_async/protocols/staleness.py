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


@dataclass(frozen=True)
class StalenessFunction:
    """A staleness weighting s(τ).

    Attributes:
        kind: `constant` s = 1; `polynomial` s = (τ + 1)^-a (FedAsync); `hinge` s = 1 for τ <= b,
            else 1 / (a (τ - b) + 1) (FedAsync); `inverse_sqrt` s = 1 / sqrt(1 + τ) (FedBuff).
        a: exponent (polynomial) or slope (hinge).
        b: hinge point in versions.
    """

    kind: StalenessKind = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "polynomial", "hinge", "inverse_sqrt"):
            raise ValueError(
                f"staleness kind must be constant, polynomial, hinge or inverse_sqrt, "
                f"got {self.kind!r}"
            )
        if self.a < 0 or not math.isfinite(self.a):
            raise ValueError(f"staleness a must be finite and >= 0, got {self.a}")
        if self.b < 0 or not math.isfinite(self.b):
            raise ValueError(f"staleness b must be finite and >= 0, got {self.b}")

    def __call__(self, staleness: int) -> float:
        """Weight of an update `staleness` versions old."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((staleness + 1) ** -self.a)
        if self.kind == "hinge":
            return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0 / math.sqrt(1.0 + staleness)

    @classmethod
    def parse(cls, text: str) -> StalenessFunction:
        """Build from `kind[:a[:b]]`, e.g. `polynomial:0.5`, `hinge:10:4`, `constant`."""
        kind, *numbers = text.split(":")
        values = [float(n) for n in numbers]
        defaults = {"hinge": (10.0, 4.0)}.get(kind, (0.5, 4.0))
        a = values[0] if values else defaults[0]
        b = values[1] if len(values) > 1 else defaults[1]
        return cls(kind, a, b)  # type: ignore[arg-type]
