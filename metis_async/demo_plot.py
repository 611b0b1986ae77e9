"""The figure of `metis-async demo --compare`: test accuracy against wall-clock time, per protocol.

Imports matplotlib (the demo extra) at the top, so import this module only when plotting. It draws
on a `Figure` with the Agg canvas, never pyplot: no global state, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from metis_async.demo import DemoResult

__all__ = ["plot_accuracy"]


def plot_accuracy(
    results: Sequence[DemoResult],
    path: str | Path,
    title: str,
    *,
    target: float = 0.90,
) -> Path:
    """Write a PNG of each result's test accuracy against time, one line per protocol.

    Args:
        results: demo runs, e.g. from `compare_protocols`; each is drawn from its
            `seconds_history` (x, seconds since the run started) and `accuracy_history` (y).
        path: the PNG to write (overwritten if it exists).
        title: the figure's title (what was compared: learners, stragglers, slowdown).
        target: test accuracy marked with a dashed horizontal line (fraction, 0..1).

    Returns:
        The path written.
    """
    figure = Figure(figsize=(8.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas: savefig renders with Agg
    axes = figure.add_subplot()
    for result in results:
        if len(result.seconds_history) != len(result.accuracy_history):
            raise ValueError(
                f"{result.protocol}: {len(result.seconds_history)} times for "
                f"{len(result.accuracy_history)} accuracies"
            )
        axes.plot(
            result.seconds_history,
            result.accuracy_history,
            marker=".",
            markersize=4,
            label=result.protocol,
        )
    axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target:.2f}")
    axes.set_xlabel("wall-clock time since the controller started (s)")
    axes.set_ylabel("test accuracy (fraction)")
    axes.set_title(title)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    out = Path(path)
    figure.savefig(out, format="png")
    return out
