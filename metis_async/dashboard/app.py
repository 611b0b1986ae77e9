"""The dashboard's aiohttp application: routes, authentication and security headers.

    GET  /                 the page (a login form, 401, when not authenticated)
    GET  /static/...       the page's script, stylesheet and Chart.js (public: no run data)
    GET  /api/summary      source.summary() as JSON
    GET  /api/learners     ?offset=0&limit=50&sort=learner_id&desc=0 (limit capped at MAX_PAGE)
    GET  /api/events       server-sent events: `event: summary` every interval
    GET  /login?token=...  (or POST the form) sets the session cookie, redirects to /
    GET  /healthz          "ok", unauthenticated

Imported by `Dashboard.start()` only: aiohttp costs ~0.4 s of import time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from metis_async.dashboard.auth import COOKIE_NAME, AdminAuth
from metis_async.dashboard.broadcast import SummaryBroadcast, encode_json
from metis_async.dashboard.source import MAX_PAGE, SORT_KEYS, DashboardSource

log = structlog.get_logger("metis_async.dashboard")

STATIC = Path(__file__).parent / "static"
DEFAULT_PAGE = 50

SECURITY_HEADERS = {
    # No inline script or style anywhere: the page's code is static/dashboard.js.
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # /login?token= must not leak through a Referer
}

_PUBLIC = frozenset({"/healthz", "/login"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=encode_json(value),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _see_root() -> web.Response:
    return web.Response(status=303, headers={"Location": "/"})


def _bad_request(message: str) -> web.Response:
    return _json({"error": message}, status=400)


class DashboardApp:
    """The handlers, bound to one source, one authenticator and one broadcast.

    Args:
        source: where the data comes from.
        auth: who may read it.
        broadcast: the shared summary stream for `/api/events`.
    """

    def __init__(
        self, source: DashboardSource, auth: AdminAuth, broadcast: SummaryBroadcast
    ) -> None:
        self._source = source
        self._auth = auth
        self._broadcast = broadcast
        self._page = (STATIC / "index.html").read_bytes()
        self._login = (STATIC / "login.html").read_text(encoding="utf-8")

    def build(self) -> web.Application:
        """The aiohttp application serving the routes in the module docstring."""
        app = web.Application(middlewares=[self._authenticate], client_max_size=64 * 1024)
        app.on_response_prepare.append(_add_security_headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/login", self._login_get)
        app.router.add_post("/login", self._login_post)
        app.router.add_get("/api/summary", self._summary)
        app.router.add_get("/api/learners", self._learners)
        app.router.add_get("/api/events", self._events)
        app.router.add_static("/static/", STATIC, follow_symlinks=False, show_index=False)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        public = request.path in _PUBLIC or request.path.startswith("/static/")
        if public or self._auth.authorized(
            request.headers.get("Authorization"), request.cookies.get(COOKIE_NAME)
        ):
            return await handler(request)
        if request.path == "/":
            return self._login_page("", status=401)
        return web.Response(
            body=encode_json({"error": "unauthorized: send Authorization: Bearer <admin token>"}),
            status=401,
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="metis-async dashboard"'},
        )

    def _login_page(self, message: str, status: int) -> web.Response:
        html = self._login.replace("<!--message-->", message)  # fixed texts only, no user input
        return web.Response(
            text=html,
            status=status,
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    def _log_in(self, request: web.Request, token: str | None) -> web.StreamResponse:
        if not self._auth.required:
            return _see_root()
        if token is None or not self._auth.token_matches(token):
            log.warning("dashboard_login_refused", remote=request.remote)
            return self._login_page("That is not the admin token." if token else "", status=401)
        response = _see_root()
        response.set_cookie(
            COOKIE_NAME,
            self._auth.cookie_value,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=request.secure or None,
        )
        return response

    async def _login_get(self, request: web.Request) -> web.StreamResponse:
        return self._log_in(request, request.query.get("token"))

    async def _login_post(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = form.get("token")
        return self._log_in(request, token if isinstance(token, str) else None)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _summary(self, request: web.Request) -> web.StreamResponse:
        try:
            summary = self._source.summary()
        except Exception:  # the source is the controller's code: answer, log, keep serving
            log.exception("dashboard_summary_failed")
            return _json({"error": "the controller could not summarise the run"}, status=500)
        return _json(summary)

    async def _learners(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            offset = int(query.get("offset", "0"))
            limit = int(query.get("limit", str(DEFAULT_PAGE)))
        except ValueError:
            return _bad_request("offset and limit must be integers")
        if offset < 0 or limit < 0:
            return _bad_request("offset and limit must not be negative")
        sort = query.get("sort", "learner_id")
        if sort not in SORT_KEYS:
            return _json(
                {"error": f"unknown sort key {sort!r}", "sort_keys": list(SORT_KEYS)}, status=400
            )
        desc = query.get("desc", "0").lower()
        if desc not in _TRUE | _FALSE:
            return _bad_request("desc must be 0 or 1")
        try:
            page = self._source.learners(offset, min(limit, MAX_PAGE), sort, desc in _TRUE)
        except Exception:
            log.exception("dashboard_learners_failed", offset=offset, limit=limit, sort=sort)
            return _json({"error": "the controller could not list its learners"}, status=500)
        return _json(page)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies must pass each event on at once
            }
        )
        await response.prepare(request)
        seen = self._broadcast.subscribe()
        try:
            await response.write(b"retry: 3000\n\n")  # reconnect after 3 s if the link drops
            while (next_frame := await self._broadcast.next_frame(seen)) is not None:
                seen, frame = next_frame
                await response.write(frame)
        except ConnectionResetError:  # the browser went away
            pass
        finally:
            self._broadcast.unsubscribe()
        return response  # aiohttp ends the stream (and ignores a client already gone)


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
