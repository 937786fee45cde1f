"""The metrics contract dashboards and alerts rely on: every known label value exists from the start
(a ``rate()`` alert needs a series before the first event), capacities are exported, and the latency
histogram observes exactly the scored readings."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sensorwatch.scoring.batch import RejectReason
from service.app import create_app
from service.metrics import REJECT_REASONS, RELOAD_OUTCOMES, SOURCES, Metrics
from service.settings import load_settings
from tests.support import ADMIN_TOKEN, metric, parse_metrics

T0 = 1_767_225_600.0
SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"


def make_client(tmp_path: Path, **overrides: Any) -> TestClient:
    params: dict[str, Any] = {
        "mqtt_url": "",
        "admin_token": ADMIN_TOKEN,
        "state_dir": tmp_path / "state",
        "models_dir": tmp_path / "models",  # empty: the default model falls back to the built-in one
        "max_wait_ms": 1.0,
        **overrides,
    }
    return TestClient(create_app(load_settings(**params)))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        yield c


def test_fresh_app_exports_every_rejection_reason_at_zero(client: TestClient) -> None:
    samples = parse_metrics(client.get("/metrics").text)
    exported = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "sensorwatch_rejections_total"
    }
    assert set(exported) == set(REJECT_REASONS)
    assert all(v == 0 for v in exported.values()), exported
    assert {r.value for r in RejectReason} <= set(exported)
    for reason in ("payload_too_large", "malformed_json", "bad_payload", "queue_full", "internal_error"):
        assert reason in exported


def test_fresh_app_exports_every_closed_label_set_at_zero(client: TestClient) -> None:
    samples = parse_metrics(client.get("/metrics").text)
    for outcome in RELOAD_OUTCOMES:
        assert samples[("sensorwatch_model_reloads_total", frozenset({("outcome", outcome)}))] == 0
    for source in SOURCES:
        for outcome in ("scored", "rejected"):
            key = ("sensorwatch_readings_total", frozenset({("source", source), ("outcome", outcome)}))
            assert samples[key] == 0


def test_every_reason_the_service_uses_is_pre_created() -> None:
    """A new reason string in service/ must be added to REJECT_REASONS (else it has no series until
    it first happens)."""
    used: set[str] = set()
    for path in SERVICE_DIR.glob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r'PayloadError\(\s*"([a-z_]+)"', text))
        used |= set(re.findall(r'rejections\.labels\(\s*"([a-z_]+)"', text))
        used |= set(re.findall(r'deadletter\(\s*"([a-z_]+)"', text))
        used |= set(re.findall(r'rest_rejection\(\s*"([a-z_]+)"', text))
    assert {"payload_too_large", "malformed_json", "queue_full", "internal_error"} <= used  # the scan works
    assert not used - set(REJECT_REASONS), used - set(REJECT_REASONS)


def test_capacity_gauges_come_from_the_settings(tmp_path: Path) -> None:
    with make_client(tmp_path, max_queue=5000, max_devices=777) as c:
        text = c.get("/metrics").text
    assert metric(text, "sensorwatch_queue_capacity") == 5000
    assert metric(text, "sensorwatch_max_devices") == 777


def test_capacity_gauges_exist_in_a_fresh_registry() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    assert {"sensorwatch_queue_capacity", "sensorwatch_max_devices"} <= names


def test_latency_observes_scored_readings_only(client: TestClient) -> None:
    good = [{"ts": T0 + i, "values": [20.0 + 0.1 * (i % 5)]} for i in range(20)]
    bad = [{"ts": T0 + 5, "values": [20.0]}]  # out of order: rejected
    for body in ({"device_id": "d", "readings": good}, {"device_id": "d", "readings": bad}):
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, r.text
    text = client.get("/metrics").text
    assert metric(text, "sensorwatch_readings_total", source="rest", outcome="scored") == 20
    assert metric(text, "sensorwatch_readings_total", source="rest", outcome="rejected") == 1
    assert metric(text, "sensorwatch_rejections_total", reason="out_of_order") == 1
    assert metric(text, "sensorwatch_score_latency_seconds_count") == 20
    assert metric(text, "sensorwatch_score_latency_seconds_bucket", le="+Inf") == 20
    assert metric(text, "sensorwatch_likelihood_count") == 20
    assert metric(text, "sensorwatch_batch_size_sum") == 21  # the scorer still saw all of them


def test_anomaly_events_count_episodes_by_kind(client: TestClient) -> None:
    """Every kind is exported from the start; a stuck run is many flagged readings but one event."""
    text = client.get("/metrics").text
    for kind in ("pattern", "contextual", "spike", "stuck", "out_of_range"):
        assert metric(text, "sensorwatch_anomaly_events_total", kind=kind) == 0
    rng = np.random.default_rng(0)
    values = 20.0 + np.sin(np.arange(400) / 8.0) + 0.1 * rng.standard_normal(400)
    values[300:360] = values[300]  # a stuck sensor
    readings = [{"ts": T0 + 60 * i, "values": [float(v)]} for i, v in enumerate(values)]
    r = client.post("/v1/score", json={"device_id": "d", "readings": readings})
    assert r.status_code == 200, r.text
    flagged = [res for res in r.json()["results"] if res.get("is_anomaly")]
    stuck = [res for res in flagged if res["kind"] == "stuck"]
    assert len(stuck) > 5
    assert sum(not res["continues"] for res in stuck) == 1
    assert {res["severity"] for res in stuck} <= {"high", "critical"}  # REST results carry it
    assert all(res["severity"] is None for res in r.json()["results"] if not res.get("is_anomaly"))
    text = client.get("/metrics").text
    assert metric(text, "sensorwatch_anomaly_events_total", kind="stuck") == 1
    assert metric(text, "sensorwatch_anomalies_total") == len(flagged)


def test_rest_bodies_that_are_not_json_are_counted(client: TestClient) -> None:
    """A body that is not JSON is a 400 with the reason the MQTT intake dead-letters such a message
    with (one vocabulary), counted once per request: malformed, nested too deep, a 5,000-digit number."""
    bodies = {
        b'{"device_id": "d", "readings": [': "malformed_json",
        b"[" * 5000: "too_deep",
        b'{"device_id": "d", "ts": ' + b"9" * 5000 + b"}": "number_out_of_range",
    }
    for body, reason in bodies.items():
        r = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["reason"] == reason
    assert client.get("/v1/devices/nope").status_code == 404  # other 4xx are not rejections
    text = client.get("/metrics").text
    for reason in bodies.values():
        assert metric(text, "sensorwatch_rejections_total", reason=reason) == 1
    assert metric(text, "sensorwatch_readings_total", source="rest", outcome="rejected") == len(bodies)
