"""A real headless Chromium for browser tests: Debian's `chromium` and `chromedriver`, Selenium.

    from tests.browser import chromium_driver, console_errors

    with chromium_driver() as driver:
        driver.get(url)
        ...
        assert console_errors(driver) == []

Both binaries are named explicitly (`/usr/bin/chromium`, `/usr/bin/chromedriver`, or the
`METIS_CHROMIUM` / `METIS_CHROMEDRIVER` variables), so selenium-manager never downloads a
browser. Without them, or without `selenium`, the test is skipped with the reason:
`apt-get install -y chromium chromium-driver` and `pip install -e ".[test]"` provide them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path(os.environ.get("METIS_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("METIS_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(__file__).parent / "artifacts"
"""Where browser tests leave screenshots (git-ignored)."""


@contextlib.contextmanager
def chromium_driver(width: int = 1400, height: int = 1800) -> Iterator[WebDriver]:
    """A headless Chromium (window `width` x `height` pixels) that keeps its console log, quit on
    exit; skips the test when Chromium, chromedriver or selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(
            f"no {' or '.join(missing)}: apt-get install -y chromium chromium-driver "
            "(or set METIS_CHROMIUM / METIS_CHROMEDRIVER)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip('no selenium: pip install -e ".[test]"')
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager: no usage reports

    profile = tempfile.mkdtemp(prefix="metis-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",  # loopback only: no update or safe-browsing calls
        "--disable-component-update",
        "--disable-sync",
        "--force-color-profile=srgb",
        "--force-prefers-reduced-motion",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: WebDriver) -> list[str]:
    """Messages the page logged as errors since the last call (CSP violations, exceptions, failed
    loads); reading the log empties it."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(e["message"]) for e in entries if e.get("level") == "SEVERE"]


def wait_until(
    driver: WebDriver, condition: Callable[[WebDriver], object], timeout_seconds: float = 10.0
) -> Any:
    """`condition(driver)` once it is truthy (polled every 50 ms); TimeoutException after
    `timeout_seconds`."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_seconds, poll_frequency=0.05).until(condition)


def value(driver: WebDriver, element_id: str) -> str:
    """The raw value the page keeps beside a displayed number (`data-value`); "" while the
    element is not on the page (the login form is being replaced by the page)."""
    script = "const e = document.getElementById(arguments[0]); return e ? e.dataset.value : ''"
    return str(driver.execute_script(script, element_id))


def text(driver: WebDriver, element_id: str) -> str:
    """An element's text; "" while it is not on the page."""
    script = "const e = document.getElementById(arguments[0]); return e ? e.textContent : ''"
    return str(driver.execute_script(script, element_id))


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the whole window as `tests/artifacts/<name>.png`; returns the path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
