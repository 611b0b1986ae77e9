"""The `metis-async demo --compare` plot: accuracy against wall-clock time, a line per protocol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from metis_async.demo import DemoResult
from metis_async.demo_plot import plot_accuracy

CLI = [sys.executable, "-m", "metis_async.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(protocol: str, seconds: list[float], accuracy: list[float]) -> DemoResult:
    return DemoResult(
        protocol=protocol,
        learners=3,
        versions=len(accuracy),
        final_accuracy=accuracy[-1],
        wall_seconds=seconds[-1],
        seconds_to_90=None,  # the plot reads only the histories
        accuracy_history=accuracy,
        seconds_history=seconds,
    )


def test_plot_accuracy_writes_a_png_with_a_drawing(tmp_path: Path) -> None:
    results = [
        _result("synchronous", [2.0, 4.0, 6.0, 8.0], [0.5, 0.8, 0.91, 0.93]),
        _result("buffered", [1.5, 2.5, 3.5], [0.6, 0.9, 0.94]),
    ]

    written = plot_accuracy(results, tmp_path / "curves.png", "3 learners, no stragglers")

    assert written == tmp_path / "curves.png"
    assert written.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(written)
    assert pixels.shape[0] > 0
    assert pixels.shape[1] > 0
    assert float(np.var(pixels)) > 0  # not a blank canvas


def test_plot_accuracy_rejects_times_that_do_not_match_the_accuracies(tmp_path: Path) -> None:
    broken = _result("asynchronous", [1.0, 2.0], [0.5, 0.7])
    broken.seconds_history = [1.0]

    with pytest.raises(ValueError, match="asynchronous"):
        plot_accuracy([broken], tmp_path / "broken.png", "title")


def test_demo_compare_prints_the_table_and_writes_the_default_plot(tmp_path: Path) -> None:
    # Four small federations (3 learners, 5 SGD steps a task): about 15 s on 2 cores.
    result = subprocess.run(
        [*CLI, "demo", "--compare", "--no-progress", "--learners", "3", "--local-steps", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=True,
    )

    assert "protocols on digits" in result.stdout
    assert "wrote demo-compare.png" in result.stdout
    assert (tmp_path / "demo-compare.png").read_bytes()[:8] == PNG_MAGIC
