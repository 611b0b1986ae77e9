"""The dashboard page in a real headless Chromium: numbers, live updates, charts, table, login.

Served by a real `Dashboard` over the fake source of test_dashboard_http; skipped where
Chromium or chromedriver is not installed (see tests/browser.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from metis_async.dashboard import empty_summary
from tests.browser import chromium_driver, console_errors, screenshot, text, value, wait_until
from tests.test_dashboard_http import TOKEN, DashboardThread, FakeSource, base_summary

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver


@pytest.fixture
def driver() -> Iterator[WebDriver]:
    with chromium_driver() as chromium:
        yield chromium


@pytest.fixture
def dashboard() -> Iterator[tuple[FakeSource, str]]:
    """A dashboard over a fake source with 120 learners, 200 ms between live updates."""
    source = FakeSource(learners=120)
    server = DashboardThread(source, TOKEN, interval_seconds=0.2)
    yield source, f"http://127.0.0.1:{server.port}"
    server.close()


def chart_data(driver: WebDriver, canvas_id: str) -> Any:
    """Labels and each dataset's y values of the Chart.js chart drawn on `canvas_id`."""
    return driver.execute_script(
        """const chart = Chart.getChart(arguments[0]);
        if (!chart) return null;
        return {labels: chart.data.labels,
                datasets: chart.data.datasets.map(d => d.data.map(p => p.y ?? p))};""",
        canvas_id,
    )


def table_ids(driver: WebDriver) -> list[str]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('#learners-body tr')]"
            ".map(tr => tr.dataset.learner)"
        )
    )


def shows(element_id: str, expected: str) -> Callable[[WebDriver], bool]:
    return lambda d: value(d, element_id) == expected


def test_the_page_shows_the_source_and_follows_it_live(
    driver: WebDriver, dashboard: tuple[FakeSource, str]
) -> None:
    source, url = dashboard
    driver.get(f"{url}/login?token={TOKEN}")
    wait_until(driver, shows("version", "12"))

    # Arrange / assert: the first summary, as the source has it.
    expected = {
        "run-id": "run-42",
        "state": "training",
        "version": "12",
        "connected": "5",
        "training": "3",
        "benched": "1",
        "never-contributed": "2",
        "speed-p50": "250.5",
        "updates-per-second": "2.5",
        "updates-accepted": "48",
        "updates-rejected": "7",
        "bytes-in": "123456",
        "contributing": "4",
        "participants": "6",
        "accepted-p90": "20",
        "policy-name": "AsynchronousPolicy",
    }
    assert {key: value(driver, key) for key in expected} == expected
    assert text(driver, "bytes-in") == "120.6 KiB"
    assert text(driver, "bytes-in-per-second") == "4.0 KiB/s"
    assert text(driver, "uptime") == "1m 40s"
    chips = driver.execute_script(
        "return [...document.querySelectorAll('#policy-parameters .chip')].map(c => c.textContent)"
    )
    assert chips == ["alpha=0.6", "staleness=poly"]

    # Charts: one Chart.js instance per canvas, holding the summary's points.
    versions = chart_data(driver, "chart-versions")
    assert versions["datasets"][0] == list(range(1, 13))
    assert chart_data(driver, "chart-metric-accuracy")["datasets"][0] == [
        0.5 + v / 40 for v in range(2, 13, 2)
    ]
    assert len(chart_data(driver, "chart-metric-loss")["datasets"][0]) == 6
    staleness = chart_data(driver, "chart-staleness")
    assert staleness == {
        "labels": ["0", "1", "2–3", "4–7", "8–15", "16–31", "≥32"],
        "datasets": [[10, 8, 6, 4, 2, 1, 0]],
    }
    assert chart_data(driver, "chart-rejected") == {
        "labels": ["too_stale", "not_finite"],
        "datasets": [[5, 2]],
    }
    assert chart_data(driver, "chart-participation")["datasets"] == [[0, 9, 20, 22]]

    # Act: the run moves on, with no reload of the page.
    driver.execute_script("window.notReloaded = true")
    learners = copy.deepcopy(base_summary()["learners"])
    assert isinstance(learners, dict)
    learners["connected"] = 100_000
    evaluations = source.data["evaluations"]
    versions_now = source.data["versions"]
    assert isinstance(evaluations, list)
    assert isinstance(versions_now, list)
    source.set(
        version=13,
        learners=learners,
        versions=[
            *versions_now,
            {"version": 13, "time": 1_700_000_105.0, "updates": 5, "mean_staleness": 2.0},
        ],
        evaluations=[
            *evaluations,
            {"version": 13, "time": 1_700_000_106.0, "learners": 3, "metrics": {"accuracy": 0.9}},
        ],
        rejected={"too_stale": 5, "not_finite": 2, "bad_shape": 9},
    )

    # Assert: numbers and charts follow.
    wait_until(driver, shows("version", "13"))
    wait_until(driver, shows("connected", "100000"))
    assert text(driver, "connected") == "100,000"
    assert chart_data(driver, "chart-versions")["datasets"][0] == list(range(1, 14))
    assert chart_data(driver, "chart-metric-accuracy")["datasets"][0][-1] == 0.9
    assert chart_data(driver, "chart-rejected")["labels"] == [
        "bad_shape",
        "too_stale",
        "not_finite",
    ]
    assert driver.execute_script("return window.notReloaded") is True
    assert driver.execute_script("return document.getElementById('live').dataset.live") == "true"
    print(f"screenshot: {screenshot(driver, 'dashboard')}")
    assert console_errors(driver) == []


def test_the_learner_table_is_paged_and_sorted_by_the_server(
    driver: WebDriver, dashboard: tuple[FakeSource, str]
) -> None:
    source, url = dashboard
    driver.get(f"{url}/login?token={TOKEN}")
    wait_until(driver, lambda d: len(table_ids(d)) == 50)
    assert table_ids(driver)[:2] == ["learner-000000", "learner-000001"]
    assert text(driver, "learners-range") == "1–50 of 120"

    driver.find_element("css selector", 'th[data-sort="accepted"] button').click()
    by_accepted = sorted(source.rows, key=lambda r: (r["accepted"], r["learner_id"]), reverse=True)
    wait_until(driver, lambda d: table_ids(d)[:1] == [by_accepted[0]["learner_id"]])
    driver.find_element("id", "page-next").click()

    wait_until(driver, lambda d: text(d, "learners-range") == "51–100 of 120")
    assert table_ids(driver) == [r["learner_id"] for r in by_accepted[50:100]]
    assert (
        driver.find_element("css selector", 'th[data-sort="accepted"]').get_attribute("aria-sort")
        == "descending"
    )
    assert console_errors(driver) == []


def test_the_login_form_admits_with_the_token_only(
    driver: WebDriver, dashboard: tuple[FakeSource, str]
) -> None:
    _, url = dashboard
    driver.get(url)
    assert driver.find_elements("id", "version") == []  # the login form, not the page

    driver.find_element("id", "token").send_keys("not-it")
    driver.find_element("css selector", "#login-form button").click()
    wait_until(driver, lambda d: "not the admin token" in text(d, "login-error"))
    driver.find_element("id", "token").send_keys(TOKEN)
    driver.find_element("css selector", "#login-form button").click()

    wait_until(driver, shows("version", "12"))
    cookie = driver.get_cookie("metis_dashboard")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"


def test_a_fresh_run_renders_without_errors(
    driver: WebDriver, dashboard: tuple[FakeSource, str]
) -> None:
    source, url = dashboard
    source.data = empty_summary(run_id="fresh")  # nothing happened: empty lists, no speeds
    source.rows = []
    driver.get(f"{url}/login?token={TOKEN}")

    wait_until(driver, shows("run-id", "fresh"))

    assert value(driver, "version") == "0"
    assert text(driver, "speed-p50") == "—"
    assert driver.find_element("id", "no-evaluations").is_displayed()
    assert driver.find_element("id", "no-rejections").is_displayed()
    assert chart_data(driver, "chart-versions")["datasets"] == [[], []]
    wait_until(driver, lambda d: text(d, "learners-range") == "0–0 of 0")
    assert console_errors(driver) == []
