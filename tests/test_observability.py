"""Prometheus metrics and the gRPC health service, read the way an operator's tools read them."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from metis_async.metrics import start_metrics_server
from metis_async.streams import FEDERATION, SERVICE
from metis_async.telemetry import Histogram, reason_key
from tests.conftest import ControllerThread, RawLearner, sync_policy
from tests.test_workers import _federate

Factory = Callable[..., ControllerThread]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_count_what_the_federation_did(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=4, rounds=2))
    endpoint = start_metrics_server(ct.controller, "127.0.0.1", 0)
    port = endpoint.port
    try:
        _federate(ct, learners=4)
        samples = _scrape(port)
    finally:
        endpoint.close()

    accepted = samples[("metis_updates_accepted_total", ())]
    assert samples[("metis_versions_committed_total", ())] == 2
    assert accepted == 8
    assert samples[("metis_update_staleness_versions_count", ())] == accepted
    assert samples[("metis_update_staleness_versions_bucket", (("le", "0"),))] == accepted
    assert samples[("metis_commit_seconds_count", ())] == 2
    assert samples[("metis_sessions_opened_total", (("process", "core"),))] == 4
    assert samples[("metis_bytes_received_total", (("process", "core"),))] > 8 * 40
    assert samples[("metis_bytes_sent_total", (("process", "core"),))] > 0
    assert samples[("metis_model_version", ())] == 2


def test_metrics_show_each_worker(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=6, rounds=1), workers=2)
    endpoint = start_metrics_server(ct.controller, "127.0.0.1", 0)
    port = endpoint.port
    try:
        _federate(ct, learners=6)
        deadline = time.monotonic() + 10
        sessions: dict[str, float] = {}
        while time.monotonic() < deadline and sum(sessions.values()) < 6:
            time.sleep(0.5)  # workers report every 2 s
            samples = _scrape(port)
            sessions = {
                dict(labels)["process"]: value
                for (name, labels), value in samples.items()
                if name == "metis_sessions_opened_total" and dict(labels)["process"] != "core"
            }
    finally:
        endpoint.close()

    assert set(sessions) == {"worker-0", "worker-1"}
    assert sum(sessions.values()) == 6


def test_health_follows_the_federation_state(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=2))
    waiting = (
        _health(ct.address, ""),
        _health(ct.address, SERVICE),
        _health(ct.address, FEDERATION),
    )
    learners = [RawLearner(ct.address, f"h{i}") for i in range(2)]
    for learner in learners:
        learner.until("train")

    training = _health(ct.address, FEDERATION)
    for learner in learners:
        learner.close()

    assert waiting == (SERVING, SERVING, NOT_SERVING)  # takes learners, not yet training
    assert training == SERVING


def test_health_through_workers(controller_factory: Factory) -> None:
    ct = controller_factory(sync_policy(min_learners=1), workers=2)
    learner = RawLearner(ct.address, "w")
    learner.until("train")
    statuses = set()
    for _ in range(8):  # connections spread over both workers
        statuses.add(_health(ct.address, FEDERATION))
    learner.close()

    assert statuses == {SERVING}


@pytest.mark.parametrize(
    ("reason", "key"),
    [
        ("update is 5 versions stale, max_staleness is 3", "stale"),
        ("update trained from version 1, round uses 2", "stale"),
        ("the federation has finished", "finished"),
        ("task is not part of the open round", "not_outstanding"),
        ("something new", "policy"),
    ],
)
def test_rejection_reasons_become_bounded_labels(reason: str, key: str) -> None:
    assert reason_key(reason) == key


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 7.0):
        histogram.observe(value)

    assert histogram.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert histogram.total == 10.0
