"""The dashboard of a real controller in a real headless Chromium: a federation on loopback
with reference learners, the page read while it is paused and after it finished; the numbers
must be the controller's own. Skipped with the reason where Debian's chromium is missing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from metis_async.admin.run import AdminEndpoints, AdminOptions
from tests.browser import chromium_driver, console_errors, screenshot, value, wait_until
from tests.conftest import ControllerThread, ShiftLearners, sync_policy

TOKEN = "dashboard-token-for-tests-0123"


class Served:
    """A controller with its dashboard (and Admin view) on loopback."""

    def __init__(self, workers: int = 0) -> None:
        policy = sync_policy(min_learners=3, rounds=3, evaluate_every=1)
        self.ct = ControllerThread(policy, [np.zeros(10, np.float32)], workers=workers)
        options = AdminOptions(dashboard_port=0, token=TOKEN, interval_seconds=0.2)
        self.endpoints = AdminEndpoints(self.ct.controller, options)
        self.ct.call(self.endpoints.start())
        self.url = f"http://127.0.0.1:{self.endpoints.dashboard_port}"

    def close(self) -> None:
        self.ct.call(self.endpoints.stop())
        self.ct.close()


@pytest.fixture
def driver() -> Iterator[Any]:
    with chromium_driver() as d:
        yield d


def shows(element_id: str, expected: str) -> Callable[[Any], bool]:
    return lambda d: value(d, element_id) == expected


def points(driver: Any, canvas_id: str) -> Any:
    return driver.execute_script(
        """const chart = Chart.getChart(arguments[0]);
        return chart ? chart.data.datasets.map(d => d.data.map(p => p.y ?? p)) : null;""",
        canvas_id,
    )


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "two-workers"])
def test_the_dashboard_shows_a_real_federation_live(driver: Any, workers: int) -> None:
    served = Served(workers)
    ct = served.ct
    try:
        driver.get(f"{served.url}/login?token={TOKEN}")
        ct.call(ct.controller.command(ct.controller.core.pause, "look first"))
        learners = ShiftLearners(ct.address, {"a": 0.1, "b": 0.2, "c": 0.3})

        # Paused with three learners connected: the page follows without a reload.
        wait_until(driver, shows("connected", "3"))
        wait_until(driver, shows("state", "paused"))
        paused_version = value(driver, "version")
        driver.execute_script("window.notReloaded = true")
        ct.call(ct.controller.command(ct.controller.core.unpause, "go"))
        summaries = learners.join(30)
        assert all(not isinstance(s, BaseException) for s in summaries), summaries
        wait_until(driver, shows("version", "3"))
        wait_until(driver, shows("state", "finished"))
        stats = ct.read(lambda: ct.controller.stats)
        accepted = str(stats.updates_accepted_total)
        wait_until(driver, shows("updates-accepted", accepted))
        wait_until(driver, lambda d: len(d.find_elements("css selector", "#learners-body tr")) == 3)
        versions = points(driver, "chart-versions")
        table = driver.execute_script(
            "return [...document.querySelectorAll('#learners-body tr')]"
            ".map(tr => tr.dataset.learner)"
        )
        accuracy = wait_until(driver, lambda d: points(d, "chart-metric-accuracy"))
        shot = screenshot(driver, f"dashboard-controller-{workers}-workers")

        assert paused_version == "0"
        assert driver.execute_script("return window.notReloaded") is True
        assert accepted == "9"  # 3 rounds x 3 learners
        assert value(driver, "contributing") == "3"
        assert value(driver, "workers") == str(workers)
        assert versions is not None
        assert len(versions[0]) == 3  # the version line: one point a commit
        assert sorted(table) == ["a", "b", "c"]
        assert accuracy[0][-1] == pytest.approx(0.5)
        assert shot.stat().st_size > 10_000
        assert console_errors(driver) == []
    finally:
        served.close()


def test_the_dashboard_refuses_a_browser_without_the_token(driver: Any) -> None:
    served = Served()
    try:
        driver.get(f"{served.url}/login?token=not-the-token")
        threading.Event().wait(0.5)

        assert driver.find_elements("id", "version") == []  # the login form, not the page
    finally:
        served.close()
