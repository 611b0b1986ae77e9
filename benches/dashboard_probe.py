"""Watching a controller under load: how fast its dashboard and Admin service answer.

Used by `benches/load.py --dashboard`: while the load runs, a thread in the benchmark's process
asks once a second (from the first answer until the controller exits) for the dashboard's
summary (`/api/summary`), the first page of learners
sorted by accepted updates (`/api/learners?sort=accepted&desc=1`, 50 rows) and the Admin
service's status (`metis-async status`'s call), and records each answer's latency and the
connected learners the summary showed.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from typing import Any

from metis_async.admin.client import AdminClient, AdminError, Target


class DashboardProbe:
    """Polls `http://127.0.0.1:dashboard_port` and the Admin service at `admin_port` every
    `interval_seconds` from `start()` to `stop()`.

    Args:
        dashboard_port: the controller's dashboard port (no token: loopback).
        admin_port: its Admin service port.
        interval_seconds: time between rounds of asks.
    """

    def __init__(self, dashboard_port: int, admin_port: int, interval_seconds: float = 1.0) -> None:
        self.base = f"http://127.0.0.1:{dashboard_port}"
        self.admin = Target(f"127.0.0.1:{admin_port}")
        self.interval = interval_seconds
        self.latencies: dict[str, list[float]] = {"summary": [], "learners": [], "status": []}
        self.failures: dict[str, int] = {"summary": 0, "learners": 0, "status": 0}
        self.answered = False  # once something answered, a refused connection is the end
        self.connected_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Begin polling (in a thread)."""
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop polling; the latencies (ms) and what was seen."""
        self._stop.set()
        self._thread.join(30)
        out: dict[str, Any] = {"max_connected_seen": self.connected_seen}
        for name, values in self.latencies.items():
            ordered = sorted(values)
            out[f"{name}_asks"] = len(ordered)
            out[f"{name}_failures"] = self.failures[name]
            if ordered:
                out[f"{name}_p50_ms"] = round(1000 * statistics.median(ordered), 2)
                out[f"{name}_p99_ms"] = round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2)
                out[f"{name}_max_ms"] = round(1000 * ordered[-1], 2)
        return out

    def _timed(self, name: str, ask: Any) -> Any:
        started = time.perf_counter()
        try:
            answer = ask()
        except (OSError, AdminError, ValueError) as error:
            gone = "refused" in str(error).lower() or "no admin service" in str(error).lower()
            if gone and self.answered:
                self._stop.set()  # the controller finished and exited: the run is over
            elif self.answered:
                self.failures[name] += 1  # an error or timeout while it serves: counted
            return None
        self.answered = True
        self.latencies[name].append(time.perf_counter() - started)
        return answer

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.loads(response.read())

    def _run(self) -> None:
        client = AdminClient(self.admin, timeout_seconds=30)
        try:
            while not self._stop.wait(self.interval):
                summary = self._timed("summary", lambda: self._get("/api/summary"))
                if summary is not None:
                    connected = int(summary.get("learners", {}).get("connected", 0))
                    self.connected_seen = max(self.connected_seen, connected)
                self._timed("learners", lambda: self._get("/api/learners?sort=accepted&desc=1"))
                self._timed("status", client.status)
        finally:
            client.close()
