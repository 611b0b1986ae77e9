"""The dashboard's HTTP side: a real aiohttp server on 127.0.0.1 (port 0) over a fake source.

The source is a small in-test `DashboardSource`; wiring the real controller to it is tested
elsewhere. Requests go through `http.client`, event streams are read line by line.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metis_async.dashboard import (
    MAX_PAGE,
    SORT_KEYS,
    Dashboard,
    empty_summary,
    learner_page,
)

TOKEN = "s3cret-admin-token"
STATIC = Path(__file__).parent.parent / "metis_async" / "dashboard" / "static"
T = TypeVar("T")


def learner_row(index: int) -> dict[str, object]:
    """A learner row with spread-out, partly missing values (every 7th has no speed)."""
    return {
        "learner_id": f"learner-{index:06d}",
        "connected": index % 10 != 0,
        "worker": index % 4,
        "connected_seconds": float(index % 3600),
        "last_seen_seconds": float((index * 7919) % 1000) / 10,
        "speed_examples_per_second": None if index % 7 == 0 else float((index * 104729) % 5000),
        "accepted": (index * 31) % 97,
        "rejected": index % 5,
        "last_staleness": None if index % 11 == 0 else index % 40,
    }


def base_summary() -> dict[str, object]:
    """A summary with something in every part."""
    summary = empty_summary(run_id="run-42", protocol="asynchronous", policy="AsynchronousPolicy")
    summary.update(
        policy={"name": "AsynchronousPolicy", "parameters": {"alpha": 0.6, "staleness": "poly"}},
        state="training",
        now=1_700_000_100.0,
        started=1_700_000_000.0,
        version=12,
        model_parameters=79_510,
        workers=2,
        learners={
            "connected": 5,
            "training": 3,
            "benched": 1,
            "never_contributed": 2,
            "speed_examples_per_second": {"p10": 100.0, "p50": 250.5, "p90": 900.0},
        },
        versions=[
            {"version": v, "time": 1_700_000_000.0 + 8 * v, "updates": 4, "mean_staleness": 1.5}
            for v in range(1, 13)
        ],
        evaluations=[
            {
                "version": v,
                "time": 1_700_000_001.0 + 8 * v,
                "learners": 3,
                "metrics": {"accuracy": 0.5 + v / 40, "loss": 2.0 / v},
            }
            for v in range(2, 13, 2)
        ],
        staleness={"edges": [0, 1, 2, 4, 8, 16, 32], "counts": [10, 8, 6, 4, 2, 1, 0]},
        rates={
            "updates_per_second": 2.5,
            "bytes_in_per_second": 4096.0,
            "bytes_out_per_second": 1e6,
        },
        totals={
            "updates_accepted": 48,
            "updates_rejected": 7,
            "bytes_in": 123_456,
            "bytes_out": 7e6,
        },
        rejected={"too_stale": 5, "not_finite": 2},
        participation={
            "learners": 6,
            "contributing": 4,
            "accepted": {"p10": 0, "p50": 9, "p90": 20, "max": 22},
            "top": [{"learner_id": "learner-000003", "accepted": 22}],
        },
    )
    return summary


class FakeSource:
    """A `DashboardSource` over a summary dict and plain learner rows.

    `set(...)` replaces top-level keys atomically (the server reads from its own thread), and
    `summaries` counts how often the dashboard asked.
    """

    def __init__(self, learners: int = 25) -> None:
        self.data = base_summary()
        self.rows = [learner_row(i) for i in range(learners)]
        self.summaries = 0

    def set(self, **changes: object) -> None:
        data = copy.deepcopy(self.data)
        data.update(changes)
        self.data = data

    def summary(self) -> dict[str, object]:
        self.summaries += 1
        return self.data

    def learners(self, offset: int, limit: int, sort: str, descending: bool) -> dict[str, object]:
        return learner_page(self.rows, offset, limit, sort, descending)


class DashboardThread:
    """A started `Dashboard` on its own event loop in a daemon thread."""

    def __init__(self, source: FakeSource, token: str | None, interval_seconds: float) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.dashboard = Dashboard(source, token, interval_seconds=interval_seconds)
        self.port = self.call(self.dashboard.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.dashboard.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., DashboardThread]]:
    """Start dashboards (token `TOKEN`, 50 ms interval) that are closed after the test."""
    started: list[DashboardThread] = []

    def start(
        source: FakeSource | None = None, token: str | None = TOKEN, interval_seconds: float = 0.05
    ) -> DashboardThread:
        thread = DashboardThread(source or FakeSource(), token, interval_seconds)
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.close()


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> Reply:
    """One HTTP request to the dashboard, redirects not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


class EventStream:
    """An open `/api/events` stream, read event by event."""

    def __init__(self, port: int, headers: Mapping[str, str] = BEARER) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self._connection.request("GET", "/api/events", headers=dict(headers))
        self.response = self._connection.getresponse()

    def next(self) -> tuple[str, Any] | None:
        """The next event with data as (event name, parsed JSON); None at the end of stream."""
        event, data = "message", []
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\r\n")
            if text.startswith("event:"):
                event = text[6:].strip()
            elif text.startswith("data:"):
                data.append(text[5:].strip())
            elif not text and data:
                return event, json.loads("\n".join(data))

    def close(self) -> None:
        self._connection.close()


# ---- authentication ---------------------------------------------------------------------


def test_healthz_needs_no_token(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    reply = request(server.port, "/healthz")

    assert (reply.status, reply.body) == (200, b"ok")


@pytest.mark.parametrize("path", ["/api/summary", "/api/learners", "/api/events"])
def test_the_api_refuses_requests_without_the_token(
    serve: Callable[..., DashboardThread], path: str
) -> None:
    server = serve()

    reply = request(server.port, path)

    assert reply.status == 401
    assert "error" in reply.json()
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_page_shows_a_login_form_without_the_token(
    serve: Callable[..., DashboardThread],
) -> None:
    server = serve()

    reply = request(server.port, "/")

    assert reply.status == 401
    assert b'<form method="post" action="/login"' in reply.body
    assert b"dashboard.js" not in reply.body  # no page code before login


def test_the_bearer_token_admits(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    page = request(server.port, "/", BEARER)
    summary = request(server.port, "/api/summary", BEARER)

    assert page.status == 200
    assert b'id="connected"' in page.body
    assert summary.status == 200


def test_a_wrong_bearer_token_is_refused(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    reply = request(server.port, "/api/summary", {"Authorization": f"Bearer {TOKEN}x"})

    assert reply.status == 401


def _session_cookie(reply: Reply) -> str:
    cookie = reply.headers["Set-Cookie"]
    match = re.match(r"metis_dashboard=([^;]+);", cookie)
    assert match is not None, cookie
    return match.group(1)


def test_login_sets_a_strict_http_only_cookie_that_admits(
    serve: Callable[..., DashboardThread],
) -> None:
    server = serve()

    login = request(server.port, f"/login?token={TOKEN}")
    value = _session_cookie(login)
    summary = request(server.port, "/api/summary", {"Cookie": f"metis_dashboard={value}"})

    assert login.status == 303
    assert login.headers["Location"] == "/"
    attributes = login.headers["Set-Cookie"].lower()
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    assert TOKEN not in value  # the cookie proves the token without holding it
    assert summary.status == 200


def test_login_by_form_post(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    login = request(
        server.port,
        "/login",
        {"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
        body=f"token={TOKEN}".encode(),
    )
    page = request(server.port, "/", {"Cookie": f"metis_dashboard={_session_cookie(login)}"})

    assert login.status == 303
    assert page.status == 200


def test_login_with_a_wrong_token_is_refused(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    login = request(server.port, "/login?token=guess")

    assert login.status == 401
    assert "Set-Cookie" not in login.headers
    assert b"not the admin token" in login.body


def test_a_forged_cookie_is_refused(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    for value in (TOKEN, "0" * 64, ""):
        reply = request(server.port, "/api/summary", {"Cookie": f"metis_dashboard={value}"})
        assert reply.status == 401, value


def test_a_cookie_from_another_dashboard_is_refused(
    serve: Callable[..., DashboardThread],
) -> None:
    first, second = serve(), serve()
    value = _session_cookie(request(first.port, f"/login?token={TOKEN}"))

    reply = request(second.port, "/api/summary", {"Cookie": f"metis_dashboard={value}"})

    assert reply.status == 401  # a restarted controller draws a new salt: old cookies expire


def test_without_a_token_everyone_is_admitted(serve: Callable[..., DashboardThread]) -> None:
    server = serve(token=None)

    reply = request(server.port, "/api/summary")

    assert reply.status == 200


def test_an_empty_token_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="empty"):
        Dashboard(FakeSource(), "")


# ---- the page and its static files ----------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/summary", "/static/dashboard.js", "/healthz"])
def test_responses_carry_the_security_headers(
    serve: Callable[..., DashboardThread], path: str
) -> None:
    server = serve()

    reply = request(server.port, path, BEARER)

    assert reply.status == 200
    assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_holds_no_inline_script_or_style() -> None:
    for name in ("index.html", "login.html"):
        html = (STATIC / name).read_text(encoding="utf-8")

        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
        assert all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
        assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
        assert not re.search(r"\sstyle\s*=|<style", html), "inline style"
        assert not re.search(r"(src|href)=\"(https?:)?//", html), "a file from elsewhere"


def test_chart_js_is_served_from_the_package(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    reply = request(server.port, "/static/chart.min.js")

    assert reply.status == 200
    assert "javascript" in reply.headers["Content-Type"]
    assert b"Chart.js v3.9.1" in reply.body[:200]
    assert "MIT License" in (STATIC / "chart.min.js.LICENSE").read_text(encoding="utf-8")


def test_importing_the_package_does_not_import_aiohttp() -> None:
    code = "import sys, metis_async.dashboard; sys.exit('aiohttp' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", code], check=False)

    assert result.returncode == 0


# ---- the summary --------------------------------------------------------------------------


def test_the_summary_is_the_sources(serve: Callable[..., DashboardThread]) -> None:
    source = FakeSource()
    server = serve(source)

    reply = request(server.port, "/api/summary", BEARER)

    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == source.data


def test_non_finite_numbers_reach_the_browser_as_null(
    serve: Callable[..., DashboardThread],
) -> None:
    source = FakeSource()
    source.set(
        evaluations=[{"version": 1, "time": 1.0, "learners": 1, "metrics": {"loss": math.inf}}]
    )
    server = serve(source)

    reply = request(server.port, "/api/summary", BEARER)

    assert b"Infinity" not in reply.body
    assert b"NaN" not in reply.body
    assert reply.json()["evaluations"][0]["metrics"]["loss"] is None


# ---- the learner table --------------------------------------------------------------------


def _expected(rows: list[dict[str, object]], sort: str, descending: bool) -> list[str]:
    """Learner ids in table order, sorted independently of `learner_page`: missing values last."""
    valued = [r for r in rows if r[sort] is not None]
    missing = [r for r in rows if r[sort] is None]
    valued.sort(key=lambda r: (r[sort], r["learner_id"]), reverse=descending)
    missing.sort(key=lambda r: str(r["learner_id"]))
    return [str(r["learner_id"]) for r in valued + missing]


@pytest.mark.parametrize("sort", SORT_KEYS)
@pytest.mark.parametrize("descending", [False, True])
def test_a_learner_page_is_sorted_by_the_server(
    serve: Callable[..., DashboardThread], sort: str, descending: bool
) -> None:
    source = FakeSource(learners=40)
    server = serve(source)
    desc = "1" if descending else "0"

    page = request(
        server.port, f"/api/learners?offset=10&limit=15&sort={sort}&desc={desc}", BEARER
    ).json()

    assert (page["total"], page["offset"], page["limit"], page["sort"]) == (40, 10, 15, sort)
    ids = [row["learner_id"] for row in page["learners"]]
    assert ids == _expected(source.rows, sort, descending)[10:25]


def test_learner_rows_are_passed_through(serve: Callable[..., DashboardThread]) -> None:
    source = FakeSource(learners=3)
    server = serve(source)

    page = request(server.port, "/api/learners", BEARER).json()

    assert page["learners"] == source.rows  # default: first 50 by learner id, ascending


def test_the_page_size_is_capped(serve: Callable[..., DashboardThread]) -> None:
    server = serve(FakeSource(learners=MAX_PAGE + 100))

    page = request(server.port, "/api/learners?limit=100000", BEARER).json()

    assert page["limit"] == MAX_PAGE
    assert len(page["learners"]) == MAX_PAGE


def test_an_unknown_sort_key_is_a_clear_400(serve: Callable[..., DashboardThread]) -> None:
    server = serve()

    reply = request(server.port, "/api/learners?sort=password", BEARER)

    assert reply.status == 400
    assert reply.json() == {"error": "unknown sort key 'password'", "sort_keys": list(SORT_KEYS)}


@pytest.mark.parametrize(
    "query", ["offset=-1", "limit=-5", "offset=ten", "limit=1.5", "desc=maybe"]
)
def test_bad_paging_parameters_are_a_400(serve: Callable[..., DashboardThread], query: str) -> None:
    server = serve()

    reply = request(server.port, f"/api/learners?{query}", BEARER)

    assert reply.status == 400
    assert "error" in reply.json()


def test_a_page_of_100000_learners(serve: Callable[..., DashboardThread]) -> None:
    source = FakeSource(learners=100_000)
    server = serve(source)

    page = request(
        server.port, "/api/learners?offset=50&limit=50&sort=last_seen_seconds&desc=1", BEARER
    ).json()
    last = request(server.port, "/api/learners?offset=99990&limit=50", BEARER).json()

    assert page["total"] == 100_000
    expected = _expected(source.rows, "last_seen_seconds", True)
    assert [row["learner_id"] for row in page["learners"]] == expected[50:100]
    assert [row["learner_id"] for row in last["learners"]] == [
        f"learner-{i:06d}" for i in range(99_990, 100_000)
    ]


@given(
    values=st.lists(st.one_of(st.none(), st.integers(0, 5)), max_size=30),
    limit=st.integers(1, 7),
    descending=st.booleans(),
)
def test_pages_cover_every_learner_once_in_order(
    values: list[int | None], limit: int, descending: bool
) -> None:
    rows = [{"learner_id": f"l{i:02d}", "accepted": v} for i, v in enumerate(values)]

    pages = [
        learner_page(rows, offset, limit, "accepted", descending)["learners"]
        for offset in range(0, len(rows) + limit, limit)
    ]

    ids = [row["learner_id"] for page in pages for row in page]  # type: ignore[attr-defined]
    assert ids == _expected(rows, "accepted", descending)  # type: ignore[arg-type]


# ---- live updates -------------------------------------------------------------------------


def test_events_deliver_summaries_and_follow_the_source(
    serve: Callable[..., DashboardThread],
) -> None:
    source = FakeSource()
    server = serve(source)
    stream = EventStream(server.port)
    try:
        first, second = stream.next(), stream.next()
        source.set(version=13)
        seen = [stream.next() for _ in range(5)]
    finally:
        stream.close()

    assert stream.response.headers["Content-Type"].startswith("text/event-stream")
    assert first == second == ("summary", base_summary())
    assert ("summary", {**base_summary(), "version": 13}) in seen


def test_all_event_streams_share_one_snapshot_per_interval(
    serve: Callable[..., DashboardThread],
) -> None:
    source = FakeSource()
    server = serve(source, interval_seconds=0.2)
    streams = [EventStream(server.port) for _ in range(4)]
    try:
        for _ in range(6):
            for stream in streams:
                assert stream.next() is not None
    finally:
        for stream in streams:
            stream.close()

    # One per client would be 24; each of 6 events was one snapshot, plus the connect snapshot
    # and ticks that fell between reads.
    assert source.summaries <= 12


def test_stop_ends_event_streams_cleanly(serve: Callable[..., DashboardThread]) -> None:
    server = serve()
    stream = EventStream(server.port)
    try:
        assert stream.next() is not None

        server.stop()

        while stream.next() is not None:  # the frames already sent, then the end
            pass
    finally:
        stream.close()

    assert server.dashboard.broadcast is None
    with pytest.raises(ConnectionRefusedError):
        request(server.port, "/healthz")


class BrokenSource(FakeSource):
    """A source whose every answer fails, as a bug in the controller's wiring would."""

    def summary(self) -> dict[str, object]:
        raise RuntimeError("bug")

    def learners(self, offset: int, limit: int, sort: str, descending: bool) -> dict[str, object]:
        raise RuntimeError("bug")


@pytest.mark.parametrize("path", ["/api/summary", "/api/learners"])
def test_a_failing_source_is_a_json_500_and_the_server_lives_on(
    serve: Callable[..., DashboardThread], path: str
) -> None:
    server = serve(BrokenSource())

    reply = request(server.port, path, BEARER)

    assert reply.status == 500
    assert "error" in reply.json()
    assert request(server.port, "/healthz").status == 200
