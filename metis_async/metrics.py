"""Prometheus metrics of a controller: one endpoint for the core and every ingest worker.

Counters live where they happen as plain integers (`telemetry.ControllerStats`, no locks or
label lookups on the hot path); a collector turns them into metric families when Prometheus
scrapes. Stream-side counters (sessions, bytes, protocol errors) and event-loop lag carry a
`process` label ("core", or "worker-N" with ingest workers, whose counters reach the core's
process every `STATS_INTERVAL_SECONDS`); sum over it for the whole controller. Federation
counters (updates, versions, staleness, commit time) are the core's alone.

    metis-async serve --metrics-port 9464   # then: curl 127.0.0.1:9464/metrics
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from metis_async.telemetry import ControllerStats, Histogram

# prometheus_client is imported where it is used: it costs ~55 ms of every controller start,
# and most runs serve no metrics.
if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily, Metric

    from metis_async.server import ControllerFace

STATS_INTERVAL_SECONDS = 2.0
"""How often ingest workers send their counters to the core's process."""

_STREAM_COUNTERS = (
    ("sessions_opened", "learner streams welcomed"),
    ("bytes_received", "bytes read from learner streams"),
    ("bytes_sent", "bytes written to learner streams"),
    ("protocol_errors", "streams ended for breaking the wire contract"),
    ("auth_refused", "learners refused for their credentials"),
    ("learners_cut_off", "streams ended for sending messages too fast"),
)
_CORE_COUNTERS = (
    ("updates_received", "training updates that reached the federation core"),
    ("updates_accepted", "updates folded into an aggregate"),
    ("updates_discarded", "accepted updates dropped (round abandoned, commit refused)"),
    ("evaluations_received", "evaluation results received"),
    ("versions_committed", "model versions committed"),
    ("commits_refused", "commits refused (nothing to commit, or not finite)"),
    ("learners_benched", "learners benched for tasks cancelled unanswered"),
)


class LoopLag:
    """Measures how late the event loop runs a timer (seconds): a busy loop delays every stream.

    Args:
        interval_seconds: how often to measure.
    """

    def __init__(self, interval_seconds: float = 0.25) -> None:
        self.interval = interval_seconds
        self.last_seconds = 0.0
        self.max_seconds = 0.0

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(loop.time() - before - self.interval, 0.0)
            self.last_seconds = lag
            self.max_seconds = max(self.max_seconds, lag)


class ControllerCollector:
    """The metric families of `controller` (a Controller or a WorkerHub), read at scrape time."""

    def __init__(self, controller: ControllerFace, lag: LoopLag | None = None) -> None:
        self.controller = controller
        self.lag = lag

    def processes(self) -> list[tuple[str, ControllerStats, float]]:
        """(label, stream-side counters, loop lag seconds) of each process."""
        face = self.controller
        core_lag = self.lag.last_seconds if self.lag is not None else 0.0
        workers: dict[int, tuple[ControllerStats, float]] = getattr(face, "worker_stats", {})
        rows = [("core", face.stats, core_lag)]
        rows += [(f"worker-{i}", stats, lag) for i, (stats, lag) in sorted(workers.items())]
        return rows

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client on every scrape (from its HTTP thread)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        face = self.controller
        core = face.stats
        rows = self.processes()
        for name, text in _STREAM_COUNTERS:
            family = CounterMetricFamily(f"metis_{name}", text, labels=["process"])
            for label, stats, _ in rows:
                family.add_metric([label], getattr(stats, f"{name}_total"))
            yield family
        lag = GaugeMetricFamily(
            "metis_event_loop_lag_seconds",
            "how late the event loop ran a timer",
            labels=["process"],
        )
        for label, _, seconds in rows:
            lag.add_metric([label], seconds)
        yield lag
        for name, text in _CORE_COUNTERS:
            yield CounterMetricFamily(f"metis_{name}", text, value=getattr(core, f"{name}_total"))
        rejected = CounterMetricFamily(
            "metis_updates_rejected", "updates the policy did not take", labels=["reason"]
        )
        for reason, count in sorted(dict(core.rejected_by_reason).items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "metis_learners_connected", "learners with a session", value=face.core.connected
        )
        yield GaugeMetricFamily("metis_model_version", "published version", value=face.version)
        yield _histogram(
            "metis_update_staleness_versions", "versions behind of accepted updates", core.staleness
        )
        yield _histogram(
            "metis_commit_seconds", "commit time, checkpoint included", core.commit_seconds
        )


def _histogram(name: str, text: str, histogram: Histogram) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily

    buckets = histogram.cumulative()
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=histogram.total)


class MetricsEndpoint:
    """The `/metrics` HTTP endpoint: `port` it is bound to, `close()` to stop it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port = int(server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_server(
    controller: ControllerFace, host: str, port: int, lag: LoopLag | None = None
) -> MetricsEndpoint:
    """Serve `/metrics` for `controller` on host:port (0: a free port) in a daemon thread."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(controller, lag))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
