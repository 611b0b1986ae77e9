"""Starting and stopping what the operator talks to: the Admin gRPC service and the dashboard,
both reading one `ControllerView`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from metis_async.admin.view import ControllerView

if TYPE_CHECKING:
    import grpc

    from metis_async.dashboard import Dashboard
    from metis_async.server import ControllerFace

log = structlog.get_logger("metis_async.admin")

T = TypeVar("T")


@dataclass(frozen=True)
class AdminOptions:
    """Where the operator reaches the controller (the `[admin]` settings, token read).

    Attributes:
        host: address of both services.
        port: Admin gRPC port (0: any free one); None: no Admin service.
        token: the admin token; None: calls without one are taken (loopback only).
        dashboard_port: the dashboard's HTTP port (0: any free one); None: no dashboard.
        interval_seconds: how often the view (and the dashboard's numbers) is refreshed.
        revoked_file: where revocations are appended (`server.revoked_file`).
    """

    host: str = "127.0.0.1"
    port: int | None = None
    token: str | None = None
    dashboard_port: int | None = None
    interval_seconds: float = 1.0
    revoked_file: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether anything is served."""
        return self.port is not None or self.dashboard_port is not None


class AdminEndpoints:
    """The running Admin service and dashboard of one controller (`start`, then `stop`)."""

    def __init__(self, controller: ControllerFace, options: AdminOptions) -> None:
        self.controller = controller
        self.options = options
        self.view = ControllerView(controller, options.interval_seconds)
        self.admin_port: int | None = None
        self.dashboard_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._dashboard: Dashboard | None = None
        # The page has its own thread and event loop: under 100,000 learners the core
        # process's loop is busy for seconds at a time, and the page must still answer. It
        # reads only the view's last summary and rows (replaced whole, never changed in place).
        self._page_loop: asyncio.AbstractEventLoop | None = None
        self._page_thread: threading.Thread | None = None

    async def start(self) -> None:
        """Serve what the options ask for; the bound ports are then in `admin_port` and
        `dashboard_port`."""
        options = self.options
        self.view.start()
        if options.port is not None:
            from metis_async.admin.service import start_admin_server

            self._server, self.admin_port = await start_admin_server(
                self.controller,
                self.view,
                options.host,
                options.port,
                options.token,
                options.revoked_file,
            )
        if options.dashboard_port is not None:
            from metis_async.dashboard import Dashboard

            self._dashboard = Dashboard(
                self.view,
                options.token,
                options.host,
                options.dashboard_port,
                options.interval_seconds,
            )
            self._page_loop = asyncio.new_event_loop()
            self._page_thread = threading.Thread(
                target=self._page_loop.run_forever, name="dashboard", daemon=True
            )
            self._page_thread.start()
            self.dashboard_port = await self._on_page_loop(self._dashboard.start())
            log.info("dashboard_serving", address=f"http://{options.host}:{self.dashboard_port}/")

    async def _on_page_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._page_loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._page_loop)
        return await asyncio.wrap_future(future)

    async def stop(self) -> None:
        """Stop both (calls in flight get a second to finish)."""
        if self._dashboard is not None and self._page_loop is not None:
            with contextlib.suppress(Exception):
                await self._on_page_loop(self._dashboard.stop())
            self._page_loop.call_soon_threadsafe(self._page_loop.stop)
            if self._page_thread is not None:
                await asyncio.to_thread(self._page_thread.join, 5)
            if self._page_thread is None or not self._page_thread.is_alive():
                self._page_loop.close()
            self._dashboard = self._page_loop = self._page_thread = None
        if self._server is not None:
            await self._server.stop(1.0)
        await self.view.stop()
