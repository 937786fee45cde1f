"""The issue's "Must show" list against a real Mosquitto (see ``harness`` for brokers and clients).

Every test uses its own topics and client id (``names``). Tests that stop the broker or queue more
than Mosquitto's default 1,000 messages for an absent client run a private broker.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from sensorwatch.artifacts import save_model
from sensorwatch.model.forecaster import builtin_model
from service import outcomes
from service.app import create_app
from service.payloads import records_to_publish
from tests.e2e.harness import (
    Broker,
    Collector,
    Names,
    Publisher,
    duplicates,
    free_port,
    publish_paced,
    running_service,
    service_settings,
)
from tests.support import AUTH, build_artifacts, corrupt_artifact, metric, wait_until

REPO = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600.0
DT = 60.0


def mqtt_scored(client: TestClient) -> float:
    """``sensorwatch_readings_total{source="mqtt", outcome="scored"}`` as the service exports it now."""
    return metric(client.get("/metrics").text, "sensorwatch_readings_total", source="mqtt", outcome="scored")


def series(n: int, seed: int, level: float = 20.0) -> np.ndarray:
    """A smooth daily-ish cycle with noise (what a temperature sensor might send)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return level + np.sin(2 * np.pi * t / 48) + rng.normal(0.0, 0.1, n)


def reading(i: int, value: float) -> dict[str, Any]:
    return {"ts": T0 + i * DT, "values": [float(value)]}


# -------------------------------------------------------------------------------------------- load
N_DEVICES, N_READINGS = 200, 50
#: Warm-up is 64 readings per device (nothing can be flagged before), so the devices that get a spike
#: send SPIKE_READINGS instead of 50, with the spike at SPIKE_AT. SPIKE_AT is past the range check's
#: arming (range_warmup = 300 readings): a value far outside the range seen so far gets likelihood 1,
#: whatever the fine print of the likelihood calibration (which is still being tuned).
SPIKE_DEVICES = tuple(range(5, N_DEVICES, 20))  # 10 devices
SPIKE_READINGS, SPIKE_AT, SPIKE = 360, 340, 8.0
#: Readings 50… of the spike devices go as gateway batches of this many readings (one message each).
GATEWAY_CHUNK = 10


def test_200_devices_each_reading_scored_once_in_order_and_spikes_flagged(
    names: Names, tmp_path: Path, shared_broker: str
) -> None:
    settings = service_settings(names, tmp_path, shared_broker, publish_scores=True)
    plan: dict[str, np.ndarray] = {}
    for d in range(N_DEVICES):
        n = SPIKE_READINGS if d in SPIKE_DEVICES else N_READINGS
        values = series(n, seed=d, level=10.0 + d % 17)
        if d in SPIKE_DEVICES:
            values[SPIKE_AT] += SPIKE
        plan[f"dev-{d:03d}"] = values
    total = sum(v.size for v in plan.values())
    # Round-robin over devices, one reading each, as a fleet would publish; then the spike devices'
    # longer history as gateway batches.
    messages: list[tuple[str, dict[str, Any]]] = [
        (names.topic(dev), reading(i, values[i])) for i in range(N_READINGS) for dev, values in plan.items()
    ]
    for lo in range(N_READINGS, SPIKE_READINGS, GATEWAY_CHUNK):
        for d in SPIKE_DEVICES:
            values = plan[f"dev-{d:03d}"]
            chunk = [reading(i, values[i]) for i in range(lo, min(lo + GATEWAY_CHUNK, values.size))]
            messages.append((names.topic(f"dev-{d:03d}"), {"readings": chunk}))
    collector = Collector(names.prefix)
    publisher = Publisher()
    try:
        with running_service(settings) as client:
            start = time.monotonic()
            publish_paced(publisher, messages, collector.outcomes)
            publisher.wait_acked()
            wait_until(lambda: collector.count("scores") >= total, 60, f"{total} scores")
            elapsed = time.monotonic() - start
            wait_until(lambda: mqtt_scored(client) == total, 10, "readings_total")
            time.sleep(0.3)  # a duplicate would arrive right behind
            scores = collector.docs("scores")
            anomalies = collector.docs("anomalies")
            m = client.get("/metrics").text
            assert client.get("/readyz").status_code == 200
    finally:
        publisher.close()
        collector.close()

    print(f"\n{total} readings of {N_DEVICES} devices scored in {elapsed:.1f} s")
    assert collector.count("deadletter") == 0
    # Exactly one result per reading.
    keys = [(s["device_id"], s["ts"]) for s in scores]
    assert not duplicates(keys)
    assert len(scores) == total
    assert set(keys) == {(dev, T0 + i * DT) for dev, v in plan.items() for i in range(v.size)}
    assert all(s["accepted"] and s["model_version"] == "builtin-persistence/0" for s in scores)
    # In per-device order.
    per_device: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        per_device[s["device_id"]].append(s["ts"])
    for dev, ts in per_device.items():
        assert ts == sorted(ts), dev
    # Micro-batched: far fewer scorer steps than readings.
    assert metric(m, "sensorwatch_batch_size_sum") == total
    assert metric(m, "sensorwatch_batch_size_count") < total / 5

    # A lasting episode (out of range) that ended has one end event, after its anomaly's.
    ends = [a for a in anomalies if a.get("episode") == "end"]
    anomalies = [a for a in anomalies if a.get("episode") != "end"]
    for end in ends:
        assert any(
            a["device_id"] == end["device_id"] and a["kind"] == end["kind"] and a["ts"] < end["ts"]
            for a in anomalies
        ), end
    # Every injected spike is on the anomalies topic (with the event's fields).
    flagged = {(a["device_id"], a["ts"]) for a in anomalies}
    injected = {(f"dev-{d:03d}", T0 + SPIKE_AT * DT) for d in SPIKE_DEVICES}
    assert injected <= flagged, sorted(injected - flagged)
    # Devices with 50 readings are all still warming up: they can never be flagged.
    assert all(int(dev.split("-")[1]) in SPIKE_DEVICES for dev, _ in flagged)
    flagged_scores = {(s["device_id"], s["ts"]) for s in scores if s["is_anomaly"]}
    assert flagged == flagged_scores
    assert metric(m, "sensorwatch_anomalies_total") == len(anomalies)
    event = next(a for a in anomalies if (a["device_id"], a["ts"]) in injected)
    assert {"ts", "kind", "value", "raw_score", "likelihood", "threshold", "attribution", "predicted"} <= set(
        event
    )
    assert event["kind"] in ("out_of_range", "spike")
    assert event["value"]["ch0"] == pytest.approx(plan[event["device_id"]][SPIKE_AT])
    assert event["likelihood"] >= event["threshold"] or event["kind"] == "spike"
    assert event["attribution"] == {"ch0": 1.0}
    assert event["predicted"]["ch0"] == pytest.approx(plan[event["device_id"]][SPIKE_AT - 1], abs=2.0)


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("intake", ["process", "thread"])
def test_bad_input_is_dead_lettered_counted_and_good_readings_still_scored(
    intake: str, names: Names, tmp_path: Path, shared_broker: str
) -> None:
    settings = service_settings(
        names, tmp_path, shared_broker, publish_scores=True, max_payload_bytes=1024, mqtt_intake=intake
    )
    a, b = names.topic("good-a"), names.topic("good-b")
    va, vb = series(40, seed=1), series(40, seed=2)
    x = T0 + 10_000 * DT  # timestamps of bad readings: far ahead (they must not move the state)
    bad_first: list[tuple[str, bytes, str]] = [  # (topic, payload, expected reason)
        (a, b'{"ts": 1767225600, "values": [1.0', "malformed_json"),
        (a, b"\xff\xfe not even text", "malformed_json"),
        (a, json.dumps({"ts": x, "values": [1.0, 2.0]}).encode(), "wrong_channel_count"),
        (b, f'{{"ts": {x}, "values": [NaN]}}'.encode(), "no_values"),  # the only channel missing
        (b, f'{{"ts": {x}, "values": [Infinity]}}'.encode(), "non_finite"),
        (a, json.dumps({"ts": x, "values": [1.0], "pad": "x" * 2000}).encode(), "payload_too_large"),
        (names.topic("bad!id"), json.dumps(reading(0, 1.0)).encode(), "bad_device_id"),
        (names.topic("-dash"), json.dumps(reading(0, 1.0)).encode(), "bad_device_id"),
        (b, b"[1, 2, 3]", "bad_payload"),
        (b, json.dumps({"ts": "yesterday", "values": [1.0]}).encode(), "bad_timestamp"),
        (a, json.dumps({"ts": x, "values": ["warm"]}).encode(), "bad_value"),
    ]
    collector = Collector(names.prefix)
    publisher = Publisher()
    try:
        with running_service(settings) as client:
            # Phase 1: 30 good readings per device with every message-level and reading-level defect
            # spread among them.
            for i in range(30):
                publisher.publish(a, reading(i, va[i]))
                publisher.publish(b, reading(i, vb[i]))
                if i % 3 == 0 and i // 3 < len(bad_first):
                    topic, payload, _ = bad_first[i // 3]
                    publisher.publish(topic, payload)
            for topic, payload, _ in bad_first[10:]:
                publisher.publish(topic, payload)
            wait_until(lambda: collector.count("scores") >= 60, 20, "60 scores")
            # Phase 2, once those are scored: an out-of-order timestamp, then a gateway batch with one
            # bad reading among good ones.
            publisher.publish(a, reading(10, va[10]))
            gateway = {
                "readings": [reading(30, va[30]), {"ts": T0 + 31 * DT, "values": "x"}, reading(32, va[32])]
            }
            publisher.publish(a, gateway)
            publisher.wait_acked()
            expected = [r for _, _, r in bad_first] + ["out_of_order", "bad_value"]
            wait_until(lambda: collector.count("deadletter") >= len(expected), 20, "dead letters")
            wait_until(lambda: collector.count("scores") >= 62, 20, "62 scores")
            time.sleep(0.2)
            ready = client.get("/readyz")
            m = client.get("/metrics").text
            assert client.get("/v1/devices/good-a").json()["count"] == 32
            assert client.get("/v1/devices/good-b").json()["count"] == 30
    finally:
        publisher.close()
        collector.close()

    assert ready.status_code == 200, ready.text
    dead = collector.docs("deadletter")
    assert sorted(d["reason"] for d in dead) == sorted(expected)
    for d in dead:
        assert d["detail"]
        assert d["topic"].startswith(f"t{names.ns}/")
        assert isinstance(d["payload"], str)
    too_big = next(d for d in dead if d["reason"] == "payload_too_large")
    assert too_big["truncated"] is True
    assert len(too_big["payload"]) == 1024
    assert too_big["device_id"] == "good-a"
    late = next(d for d in dead if d["reason"] == "out_of_order")
    assert (late["device_id"], late["ts"]) == ("good-a", T0 + 10 * DT)
    in_batch = [d for d in dead if d["reason"] == "bad_value" and d.get("index") == 1]
    assert len(in_batch) == 1
    assert json.loads(in_batch[0]["payload"]) == gateway
    assert {d["topic"] for d in dead if d["reason"] == "bad_device_id"} == {
        names.topic("bad!id"),
        names.topic("-dash"),
    }

    # Every good reading scored, once.
    scores = collector.docs("scores")
    keys = [(s["device_id"], s["ts"]) for s in scores]
    assert not duplicates(keys)
    want = {("good-a", T0 + i * DT) for i in (*range(30), 30, 32)} | {
        ("good-b", T0 + i * DT) for i in range(30)
    }
    assert set(keys) == want
    # Counted by reason.
    for reason in set(expected):
        assert metric(m, "sensorwatch_rejections_total", reason=reason) == expected.count(reason), reason
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="rejected") == len(expected)
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="scored") == 62
    assert metric(m, "sensorwatch_mqtt_connected") == 1


def test_a_result_that_cannot_be_published_is_dead_lettered_and_its_message_acked(
    names: Names, tmp_path: Path, shared_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strict JSON refuses NaN. Should a result carry one (the library has produced NaN likelihoods
    for a device after a reading of 1e308), the reading is dead-lettered and the message still acked:
    an unacked message would hold one of the broker's in-flight slots until a restart and then be
    scored a second time."""

    def poisoned(result: Any, start: int, stop: int, *, every: bool) -> list[dict[str, Any]]:
        records = records_to_publish(result, start, stop, every=every)
        for r in records:
            if r["device_id"] == "poison" and r["accepted"]:
                r["likelihood"] = math.nan
        return records

    monkeypatch.setattr(outcomes, "records_to_publish", poisoned)
    settings = service_settings(names, tmp_path, shared_broker, publish_scores=True)
    collector = Collector(names.prefix)
    publisher = Publisher()
    try:
        with running_service(settings):
            publisher.publish(names.topic("poison"), reading(0, 1.0))
            publisher.publish(names.topic("fine"), reading(0, 1.0))
            wait_until(lambda: collector.outcomes() >= 2, 10, "two outcomes")
        monkeypatch.undo()
        with running_service(settings):
            # Redelivered messages would come before this one.
            publisher.publish(names.topic("fine"), reading(1, 1.0))
            wait_until(lambda: collector.count("scores") >= 2, 10, "the sentinel's score")
            time.sleep(0.2)
    finally:
        publisher.close()
        collector.close()
    dead = collector.docs("deadletter")
    assert [(d["reason"], d["device_id"]) for d in dead] == [("internal_error", "poison")]
    assert [(s["device_id"], s["ts"]) for s in collector.docs("scores")] == [
        ("fine", T0),
        ("fine", T0 + DT),
    ]


# -------------------------------------------------------------------------------------------- session
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_scores_readings_published_while_the_service_was_down(
    names: Names, tmp_path: Path, private_broker: Broker, protocol: str
) -> None:
    settings = service_settings(
        names, tmp_path, private_broker.url, publish_scores=True, mqtt_protocol=protocol
    )
    devices = [f"p-{i:02d}" for i in range(20)]
    collector = Collector(names.prefix, private_broker.host, private_broker.port)
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        with running_service(settings):
            for i in range(5):
                for d in devices:
                    publisher.publish(names.topic(d), reading(i, 20.0 + i % 3))
            wait_until(lambda: collector.count("scores") >= 100, 20, "first 100 scores")
        wait_until(lambda: collector.statuses()[-1:] == ["offline"], 10, "status offline")

        # The service is away: 1,000 readings, acknowledged by the broker (queued in its session).
        for i in range(5, 55):
            for d in devices:
                publisher.publish(names.topic(d), reading(i, 20.0 + i % 3))
        publisher.wait_acked()
        time.sleep(0.3)
        assert collector.count("scores") == 100

        with running_service(settings) as client:
            wait_until(lambda: collector.count("scores") >= 1100, 30, "1,100 scores")
            wait_until(lambda: mqtt_scored(client) == 1000, 10, "readings_total 1000")
            counts = {d: client.get(f"/v1/devices/{d}").json()["count"] for d in devices}
            assert collector.statuses()[-1] == "online"
    finally:
        publisher.close()
        collector.close()

    scores = collector.docs("scores")
    keys = [(s["device_id"], s["ts"]) for s in scores]
    assert not duplicates(keys)
    assert set(keys) == {(d, T0 + i * DT) for d in devices for i in range(55)}
    assert collector.count("deadletter") == 0
    assert counts == dict.fromkeys(devices, 55)  # the snapshot's 5 + the 50 queued ones


# -------------------------------------------------------------------------------------------- reload
def test_reload_while_readings_flow(names: Names, tmp_path: Path, shared_broker: str) -> None:
    models = tmp_path / "models"
    build_artifacts(models)
    save_model(builtin_model(1), models, "uni", "3")
    corrupt_artifact(models, "uni", "3")
    settings = service_settings(names, tmp_path, shared_broker, model="uni/1", publish_scores=True)
    devices = [f"r-{i:02d}" for i in range(20)]
    rounds = 200
    total = rounds * len(devices)
    values = {d: series(rounds, seed=i) for i, d in enumerate(devices)}
    collector = Collector(names.prefix)
    publisher = Publisher()

    def stream() -> None:
        # ~1 round per 10 ms, paced like the load test (the shared broker drops beyond its queue limit).
        for i in range(rounds):
            while publisher.published - collector.outcomes() >= 400:
                time.sleep(0.002)
            for d in devices:
                publisher.publish(names.topic(d), reading(i, values[d][i]))
            time.sleep(0.01)

    streamer = threading.Thread(target=stream, name="test-streamer")
    try:
        with running_service(settings) as client:
            streamer.start()
            wait_until(lambda: collector.count("scores") >= 600, 20, "600 scores")
            r = client.post("/v1/models/reload", json={"model": "uni/2"}, headers=AUTH)
            mid_stream = streamer.is_alive()
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "kept"
            assert client.post("/v1/models/reload", json={"model": "uni/2"}).status_code == 401
            r = client.post("/v1/models/reload", json={"model": "uni/3"}, headers=AUTH)
            assert r.status_code == 422, r.text
            streamer.join(60)
            publisher.wait_acked()
            wait_until(lambda: collector.outcomes() >= total, 30, f"{total} outcomes")
            time.sleep(0.2)
            m = client.get("/metrics").text
            active = client.get("/v1/models").json()["active"]
            counts = {d: client.get(f"/v1/devices/{d}").json()["count"] for d in devices}
    finally:
        publisher.close()
        collector.close()

    assert mid_stream, "the reload must happen while readings flow"
    assert collector.count("deadletter") == 0
    scores = collector.docs("scores")
    assert not duplicates((s["device_id"], s["ts"]) for s in scores)
    assert len(scores) == total
    assert counts == dict.fromkeys(devices, rounds)  # state kept across the swap
    by_device: dict[str, list[str]] = defaultdict(list)
    for s in sorted(scores, key=lambda s: s["ts"]):
        by_device[s["device_id"]].append(s["model_version"])
    for d, versions in by_device.items():
        switch = versions.index("uni/2")
        assert switch > 0, d
        assert set(versions[:switch]) == {"uni/1"}, d
        assert set(versions[switch:]) == {"uni/2"}, d  # never back to the old one
    assert (active["name"], active["version"]) == ("uni", "2")
    assert metric(m, "sensorwatch_model_info", name="uni", version="2") == 1
    assert metric(m, "sensorwatch_model_info", name="uni", version="1") == 0
    assert metric(m, "sensorwatch_model_reloads_total", outcome="success") == 1
    assert metric(m, "sensorwatch_model_reloads_total", outcome="failure") == 1
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="scored") == total
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="rejected") == 0


# -------------------------------------------------------------------------------------------- readiness
def test_readyz_follows_the_broker_and_reconnects_are_counted(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    settings = service_settings(names, tmp_path, private_broker.url, publish_scores=True)
    with running_service(settings) as client:
        m = client.get("/metrics").text
        assert metric(m, "sensorwatch_mqtt_connected") == 1
        assert metric(m, "sensorwatch_mqtt_reconnects_total") == 0

        private_broker.stop()
        # Forget every session: only a re-subscription after the reconnect can deliver readings.
        for f in private_broker.dir.glob("*.db"):
            f.unlink()
        r = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 10, "/readyz 503")
        assert r.json()["ready"] is False
        assert r.json()["mqtt_connected"] is False
        assert client.get("/healthz").status_code == 200
        assert metric(client.get("/metrics").text, "sensorwatch_mqtt_connected") == 0

        private_broker.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, 40, "/readyz 200 again")
        m = client.get("/metrics").text
        assert metric(m, "sensorwatch_mqtt_connected") == 1
        assert metric(m, "sensorwatch_mqtt_reconnects_total") == 1

        collector = Collector(names.prefix, private_broker.host, private_broker.port)
        publisher = Publisher(private_broker.host, private_broker.port)
        try:
            publisher.publish(names.topic("after-reconnect"), reading(0, 1.0))
            wait_until(lambda: collector.count("scores") >= 1, 10, "a score after the reconnect")
            assert collector.statuses()[-1:] == ["online"]  # retained, republished on reconnect
        finally:
            publisher.close()
            collector.close()


def test_service_started_before_the_broker_gets_ready_when_it_comes(names: Names, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")  # not started yet
    try:
        settings = service_settings(names, tmp_path, broker.url)
        with TestClient(create_app(settings)) as client:
            r = client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["mqtt_connected"] is False
            assert client.get("/healthz").status_code == 200
            broker.start()
            wait_until(lambda: client.get("/readyz").status_code == 200, 40, "/readyz 200")
            m = client.get("/metrics").text
            assert metric(m, "sensorwatch_mqtt_connected") == 1
            assert metric(m, "sensorwatch_mqtt_reconnects_total") == 0  # a first connection
    finally:
        broker.stop()


def test_stop_while_the_broker_is_down_is_prompt_and_snapshots(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    settings = service_settings(names, tmp_path, private_broker.url)
    with running_service(settings) as client:
        assert (
            client.post("/v1/score", json={"device_id": "x", "readings": [reading(0, 1.0)]}).status_code
            == 200
        )
        private_broker.stop()
        wait_until(lambda: client.get("/readyz").status_code == 503, 10, "/readyz 503")
        time.sleep(1.5)  # paho is now in its reconnect backoff
        started = time.monotonic()
    assert time.monotonic() - started < 10
    assert (tmp_path / "state" / "state.safetensors").is_file()


# -------------------------------------------------------------------------------------------- SIGTERM
class Server:
    """``python -m service.cli serve`` as a subprocess (the real uvicorn + signal handling)."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--insecure-no-auth",
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, 60, "the server's /readyz")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", timeout=10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]


@pytest.mark.slow
def test_graceful_sigterm_leaves_nothing_acked_unscored_and_restores_state(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    state_dir = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    env.update(
        {
            "SENSORWATCH_MQTT_URL": private_broker.url,
            "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
            "SENSORWATCH_TOPIC_READINGS": names.readings,
            "SENSORWATCH_TOPIC_PREFIX": names.prefix,
            "SENSORWATCH_STATE_DIR": str(state_dir),
            "SENSORWATCH_MODELS_DIR": str(tmp_path / "models"),
            "SENSORWATCH_PUBLISH_SCORES": "true",
            "SENSORWATCH_SNAPSHOT_INTERVAL_S": "0",
        }
    )
    server = Server(env, free_port(), tmp_path / "server.log")
    markers = [f"m-{i}" for i in range(3)]  # get 10 readings, then nothing: their count is the snapshot's
    devices = [f"s-{i:02d}" for i in range(60)]
    per_device = 100
    total = len(markers) * 10 + len(devices) * per_device
    collector = Collector(names.prefix, private_broker.host, private_broker.port)
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        server.start()
        for i in range(10):
            for d in markers:
                publisher.publish(names.topic(d), reading(i, 5.0 + i % 2))
        wait_until(lambda: collector.count("scores") >= 30, 20, "marker scores")

        half = per_device // 2

        def burst(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                for d in devices:
                    publisher.publish(names.topic(d), reading(i, 20.0 + (i % 7) * 0.1))

        burst(0, half)
        wait_until(lambda: collector.count("scores") >= 30 + 300, 20, "some scores")
        second = threading.Thread(target=burst, args=(half, per_device))
        second.start()  # more readings arrive while the server stops
        rc = server.terminate()
        second.join(30)
        publisher.wait_acked()
        assert rc == 0, server.output()
        wait_until(lambda: collector.statuses()[-1:] == ["offline"], 10, "status offline")
        before = collector.outcomes()
        time.sleep(0.3)
        assert collector.outcomes() == before  # everything the server published had arrived
        assert 30 + 300 <= before < total, "SIGTERM must come while readings are in flight"
        assert (state_dir / "state.safetensors").is_file()
        assert "state of 63 devices written to" in server.output()

        # Restart: the snapshot is restored, the broker delivers what was not acked.
        server.start()
        for d in markers:
            info = server.get(f"/v1/devices/{d}").json()
            assert (info["count"], info["last_ts"]) == (10, T0 + 9 * DT), d
        wait_until(lambda: collector.outcomes() >= total, 30, f"{total} outcomes")
        time.sleep(0.3)
        m = server.get("/metrics").text
        counts = {d: server.get(f"/v1/devices/{d}").json()["count"] for d in devices}
        assert server.terminate() == 0
        assert "restored state of 63 devices" in server.output(tail=10**7)

        # A crash (no clean disconnect): the broker publishes the last will, retained.
        server.start()
        wait_until(lambda: collector.statuses()[-1:] == ["online"], 10, "status online")
        server.kill()
        wait_until(lambda: collector.statuses()[-1:] == ["offline"], 10, "last will")
        late = Collector(names.prefix, private_broker.host, private_broker.port)
        try:
            wait_until(lambda: late.messages("status"), 5, "retained status")
            assert late.messages("status") == [(f"{names.prefix}/status", b"offline", True)]
        finally:
            late.close()
    finally:
        server.kill()
        publisher.close()
        collector.close()

    # Every reading has exactly one outcome, and it is a score (nothing scored twice, nothing lost).
    assert collector.count("deadletter") == 0, collector.docs("deadletter")[:3]
    scores = collector.docs("scores")
    keys = [(s["device_id"], s["ts"]) for s in scores]
    assert not duplicates(keys)
    assert len(keys) == total
    # The restarted server scored exactly what the first one had not: acked ⇒ scored before the stop.
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="scored") == total - before
    assert counts == dict.fromkeys(devices, per_device)


# -------------------------------------------------------------------------------------------- backpressure
def test_backpressure_with_a_tiny_queue_loses_nothing(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    """With room for 16 readings, intake blocks paho's network thread while the batcher scores, publishes
    and acks: no deadlock, the broker holds the backlog, every reading is scored once."""
    settings = service_settings(
        names, tmp_path, private_broker.url, publish_scores=True, max_queue=16, max_batch=8, max_wait_ms=1
    )
    devices = [f"q-{i}" for i in range(10)]
    collector = Collector(names.prefix, private_broker.host, private_broker.port)
    publisher = Publisher(private_broker.host, private_broker.port)
    depths = []
    try:
        with running_service(settings) as client:
            for i in range(80):
                for d in devices:
                    publisher.publish(names.topic(d), reading(i, 1.0 + i % 4))
            publisher.wait_acked()
            deadline = time.monotonic() + 60
            while collector.outcomes() < 800:
                assert time.monotonic() < deadline, f"only {collector.outcomes()} of 800 scored"
                depths.append(metric(client.get("/metrics").text, "sensorwatch_queue_depth"))
                time.sleep(0.01)
            m = client.get("/metrics").text
    finally:
        publisher.close()
        collector.close()
    assert max(depths, default=0) <= 16
    assert collector.count("deadletter") == 0
    assert not duplicates((s["device_id"], s["ts"]) for s in collector.docs("scores"))
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="scored") == 800
    assert metric(m, "sensorwatch_batch_size_count") >= 100  # at most 8 per step


def test_retained_readings_are_refused_counted_and_not_scored(
    names: Names, tmp_path: Path, shared_broker: str
) -> None:
    """A retained reading is replayed by the broker on every subscribe: by default it is rejected
    'retained' (dead-lettered, counted), on each start, and live readings on the same topic score."""
    topic = names.topic("kept")
    publisher = Publisher()
    publisher.publish(topic, reading(0, 20.0), retain=True)
    publisher.wait_acked()
    settings = service_settings(names, tmp_path, shared_broker, publish_scores=True)
    collector = Collector(names.prefix)
    try:
        for start in range(2):  # the broker replays it to the restarted service too
            with running_service(settings) as client:
                want = start + 1
                wait_until(lambda n=want: collector.count("deadletter") >= n, 20, "the retained one")
                publisher.publish(topic, reading(want, 21.0))
                wait_until(lambda n=want: collector.count("scores") >= n, 20, "the live one scored")
                m = client.get("/metrics").text
                assert metric(m, "sensorwatch_rejections_total", reason="retained") == 1
    finally:
        publisher.publish(topic, b"", retain=True)  # clears the retained message
        publisher.wait_acked()
        publisher.close()
        collector.close()
    assert [d["reason"] for d in collector.docs("deadletter")] == ["retained", "retained"]
    assert [s["ts"] for s in collector.docs("scores")] == [T0 + DT, T0 + 2 * DT]


# -------------------------------------------------------------------------------------------- hostile
def test_hostile_payloads_are_dead_lettered_and_intake_goes_on(
    names: Names, tmp_path: Path, shared_broker: str
) -> None:
    """Payloads that once raised inside paho's network thread (stopping all MQTT intake while /readyz
    said 200): nesting 12,000 deep, a 5,000-digit integer, random bytes."""
    hostile = [
        b'{"a":' * 12_000 + b"1" + b"}" * 12_000,
        b"[" * 60_000,
        b'{"ts": 1767225600, "values": [' + b"9" * 5000 + b"]}",
        bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8)),
    ]
    settings = service_settings(
        names, tmp_path, shared_broker, publish_scores=True, max_payload_bytes=200_000
    )
    collector = Collector(names.prefix)
    publisher = Publisher()
    try:
        with running_service(settings) as client:
            for payload in hostile:
                publisher.publish(names.topic("target"), payload)
            for i in range(20):
                publisher.publish(names.topic("target"), reading(i, 20.0 + math.sin(i)))
            publisher.wait_acked()
            wait_until(lambda: collector.count("scores") >= 20, 20, "the 20 good readings scored")
            wait_until(
                lambda: collector.count("deadletter") >= len(hostile), 20, "the hostile ones dead-lettered"
            )
            ready = client.get("/readyz")
            m = client.get("/metrics").text
    finally:
        publisher.close()
        collector.close()
    assert ready.status_code == 200, ready.text
    dead = collector.docs("deadletter")
    reasons = ["too_deep", "too_deep", "number_out_of_range", "malformed_json"]
    assert sorted(d["reason"] for d in dead) == sorted(reasons)
    assert all(d["event_id"] and d["detail"] for d in dead)
    assert [s["ts"] for s in collector.docs("scores")] == [T0 + i * DT for i in range(20)]
    for reason in set(reasons):
        assert metric(m, "sensorwatch_rejections_total", reason=reason) == reasons.count(reason)
    assert metric(m, "sensorwatch_readings_total", source="mqtt", outcome="scored") == 20
