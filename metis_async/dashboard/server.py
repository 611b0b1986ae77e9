"""`Dashboard`: the controller's live web page, served on its own port beside the gRPC one.

    dashboard = Dashboard(source, token=admin_token, port=8080)
    port = await dashboard.start()   # then open http://127.0.0.1:8080/login?token=...
    ...
    await dashboard.stop()           # ends every event stream, then closes the port

Run it on the controller's event loop: the source is read there, with no locking.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from metis_async.dashboard.auth import AdminAuth
from metis_async.dashboard.broadcast import SummaryBroadcast
from metis_async.dashboard.source import DashboardSource

if TYPE_CHECKING:
    from aiohttp import web

log = structlog.get_logger("metis_async.dashboard")

SHUTDOWN_SECONDS = 2.0
"""How long `stop()` lets requests in flight finish before cancelling them."""


class Dashboard:
    """Serves the dashboard page and its JSON and event-stream API over HTTP.

    Args:
        source: where the numbers come from (see `metis_async.dashboard.source`).
        token: the admin API's bearer token, required of every request but `/healthz`,
            `/login` and static files; None serves without authentication.
        host: address to bind; keep the default loopback unless a token is set.
        port: TCP port; 0 picks a free one (`start()` returns it).
        interval_seconds: time between live updates pushed to open pages (seconds).

    Raises:
        ValueError: an empty token or a non-positive interval.
    """

    def __init__(
        self,
        source: DashboardSource,
        token: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        interval_seconds: float = 1.0,
    ) -> None:
        if not interval_seconds > 0:
            raise ValueError("interval_seconds must be positive")
        self._source = source
        self._auth = AdminAuth(token)
        self._host = host
        self._port = port
        self._interval = interval_seconds
        self._broadcast: SummaryBroadcast | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def broadcast(self) -> SummaryBroadcast | None:
        """The live-update stream while started (its `snapshots` and `subscribers` counts)."""
        return self._broadcast

    async def start(self) -> int:
        """Bind the port and start serving; returns the bound port.

        Raises:
            RuntimeError: already started.
            OSError: the port cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("the dashboard is already started")
        from aiohttp import web  # ~0.4 s of imports, paid only by controllers that serve a page

        from metis_async.dashboard.app import DashboardApp

        broadcast = SummaryBroadcast(self._source, self._interval)
        app = DashboardApp(self._source, self._auth, broadcast).build()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._broadcast = runner, broadcast
        self._ticker = asyncio.create_task(broadcast.run(), name="dashboard-broadcast")
        port = int(runner.addresses[0][1])
        log.info("dashboard_started", host=self._host, port=port, auth=self._auth.required)
        return port

    async def stop(self) -> None:
        """End every event stream cleanly, then stop serving; safe to call twice."""
        runner, broadcast, ticker = self._runner, self._broadcast, self._ticker
        self._runner = self._broadcast = self._ticker = None
        if runner is None:
            return
        if broadcast is not None:
            broadcast.close()  # event-stream handlers return, finishing their responses
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        await runner.cleanup()
        log.info("dashboard_stopped")
