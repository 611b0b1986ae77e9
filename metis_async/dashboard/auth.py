"""Who may see the dashboard: the admin bearer token, or a cookie that proves it was given.

API clients send `Authorization: Bearer <admin token>`. Browsers cannot add headers to an
`EventSource`, so `/login` takes the token once (a form, or `?token=`) and sets a cookie. The
cookie does not hold the token: it is an HMAC of it keyed by a random salt drawn at start, so a
leaked cookie reveals nothing and stops working when the controller restarts or the token
changes. Both are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

COOKIE_NAME = "metis_dashboard"


class AdminAuth:
    """Checks dashboard requests against the admin `token`; `None` lets everyone in.

    Args:
        token: the admin API's bearer token, or None to serve without authentication (only
            sensible on a loopback address).

    Raises:
        ValueError: `token` is empty.
    """

    def __init__(self, token: str | None) -> None:
        if token is not None and not token:
            raise ValueError("the dashboard token must not be empty (None disables auth)")
        self.required = token is not None
        self._token = (token or "").encode()
        salt = secrets.token_bytes(32)
        self._cookie = hmac.new(salt, self._token, hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Whether `given` is the admin token (constant time)."""
        return self.required and hmac.compare_digest(given.encode(), self._token)

    def authorized(self, authorization: str | None, cookie: str | None) -> bool:
        """Whether a request with this `Authorization` header and dashboard cookie may pass."""
        if not self.required:
            return True
        if authorization is not None:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
                return True
        return cookie is not None and hmac.compare_digest(cookie.encode(), self._cookie.encode())

    @property
    def cookie_value(self) -> str:
        """The value `/login` sets in the `COOKIE_NAME` cookie."""
        return self._cookie
