"""The controller's event loop runs with the garbage collector tuned for many long-lived
objects, and gives the process its collector back afterwards."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from metis_async.runtime import PYTHON_DEFAULT_GC_THRESHOLDS, SERVING_GC_THRESHOLDS
from metis_async.server import run_event_loop


async def _thresholds_inside() -> tuple[int, int, int]:
    await asyncio.sleep(0)
    return gc.get_threshold()


@pytest.fixture
def default_thresholds() -> Iterator[None]:
    previous = gc.get_threshold()
    gc.set_threshold(*PYTHON_DEFAULT_GC_THRESHOLDS)
    yield
    gc.set_threshold(*previous)


@pytest.mark.usefixtures("default_thresholds")
def test_the_loop_runs_with_serving_thresholds_and_restores_the_defaults() -> None:
    inside = run_event_loop(_thresholds_inside())

    assert inside == SERVING_GC_THRESHOLDS
    assert gc.get_threshold() == PYTHON_DEFAULT_GC_THRESHOLDS


@pytest.mark.usefixtures("default_thresholds")
def test_thresholds_the_application_chose_are_left_alone() -> None:
    gc.set_threshold(1234, 5, 6)

    inside = run_event_loop(_thresholds_inside())

    assert inside == (1234, 5, 6)
    assert gc.get_threshold() == (1234, 5, 6)


@pytest.mark.usefixtures("default_thresholds")
def test_the_defaults_come_back_when_the_served_coroutine_fails() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_event_loop(fails())

    assert gc.get_threshold() == PYTHON_DEFAULT_GC_THRESHOLDS


def _thresholds_after(code: str) -> tuple[int, ...]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport gc\nprint(*gc.get_threshold())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return tuple(int(part) for part in done.stdout.split())


def test_a_controller_entry_point_raises_the_thresholds_before_its_imports() -> None:
    assert _thresholds_after("import metis_async.cli") == SERVING_GC_THRESHOLDS


def test_an_entry_point_leaves_thresholds_set_before_it_alone() -> None:
    chosen = _thresholds_after("import gc\ngc.set_threshold(900, 9, 9)\nimport metis_async.cli")

    assert chosen == (900, 9, 9)


def test_the_learner_package_keeps_the_default_thresholds() -> None:
    assert _thresholds_after("import metis_async.client") == PYTHON_DEFAULT_GC_THRESHOLDS
