"""Hostile MQTT messages through a real Mosquitto into a real ``sensorwatch serve`` (issue #13, the
first "Must show"): 10,000 messages drawn from tests/fuzz.py's strategies, interleaved with 10,000
good readings of 50 devices (most hostile messages go to those same devices' topics), then the
service is stopped, more of both are published while it is down (queued in its persistent session),
and it is started again. Checked:

* every good reading scored exactly once (its score published once), none lost or refused;
* every hostile message dead-lettered exactly as often as its strategy says (1 for a message refused
  whole or a single reading, n for a gateway batch of n), each with a reason of the one vocabulary
  and never ``internal_error``;
* the metrics agree with the dead letters and scores, reason by reason;
* ``/readyz`` answered 200 at every poll while the service ran, and its log holds no traceback.

``SENSORWATCH_FUZZ_MESSAGES`` changes the number of hostile messages of the first part (default
10,000, as the issue asks; the second part is 1,000). A private Mosquitto: the shared one keeps its
default queue of 1,000 messages per client, beyond which it drops QoS1 messages to a subscriber that
falls behind — this test's own collector, sharing a core with the publisher, did (seen in
``make test``: every outcome published by the service, not all received).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from service.metrics import REJECT_REASONS
from tests.e2e.harness import Broker, Collector, Names, Publisher
from tests.e2e.procs import ServiceProcess
from tests.fuzz import MAX_PAYLOAD, MAX_READINGS, Hostile, hostile_message
from tests.support import parse_metrics, wait_until

T0 = 1_767_225_600
GOOD_DEVICES = [f"g{i:02d}" for i in range(50)]
N_FIRST = int(os.environ.get("SENSORWATCH_FUZZ_MESSAGES", "10000"))
N_QUEUED = 1_000


class Feed:
    """Publishes hostile messages from hypothesis, each followed by one good reading, and keeps the
    tally of what must come out."""

    def __init__(self, names: Names, publisher: Publisher) -> None:
        self.names, self.publisher = names, publisher
        self.sent: set[tuple[str, bytes]] = set()
        self.good: list[tuple[str, float]] = []
        self.expected_dead = 0
        self.kinds: Counter[str] = Counter()
        self.next_ts = dict.fromkeys(GOOD_DEVICES, T0)

    def run(self, n: int, base_seed: int) -> None:
        """Publish ``n`` distinct hostile messages drawn by hypothesis (seeded: the same run every time;
        hypothesis repeats itself, so it may draw up to 2n)."""
        target = len(self.sent) + n

        @settings(
            max_examples=2 * n,
            deadline=None,
            database=None,
            phases=(Phase.generate,),
            suppress_health_check=list(HealthCheck),
        )
        @given(h=hostile_message, k=st.integers(0, len(GOOD_DEVICES) - 1))
        def publish(h: Hostile, k: int) -> None:
            if len(self.sent) >= target:
                return
            device = GOOD_DEVICES[k] if h.device in ("d0", "d1", "d2") else h.device
            topic = self.names.topic(device)
            if (topic, h.payload) in self.sent:
                return  # hypothesis repeats itself; an identical message is not a new test
            self.sent.add((topic, h.payload))
            self.publisher.publish(topic, h.payload)
            self.expected_dead += h.outcomes
            self.kinds[h.kind] += 1
            good = GOOD_DEVICES[(k + 1) % len(GOOD_DEVICES)]
            ts = self.next_ts[good]
            self.next_ts[good] = ts + 60
            self.publisher.publish(
                self.names.topic(good), {"ts": ts, "values": [20.0 + (ts // 60) % 7 * 0.1]}
            )
            self.good.append((good, float(ts)))

        seed(base_seed)(publish)()


def _wait_outcomes(collector: Collector, svc: ServiceProcess, scores: int, dead: int, timeout: float) -> None:
    """Until the collector has seen ``scores`` scores and ``dead`` dead letters; on a timeout the
    failure says how far it got and what the service's metrics and log say."""
    try:
        wait_until(
            lambda: collector.count("scores") >= scores and collector.count("deadletter") >= dead,
            timeout,
            f"{scores} scores and {dead} dead letters",
        )
    except AssertionError as exc:
        got = f"got {collector.count('scores')} scores and {collector.count('deadletter')} dead letters"
        text = svc.metrics() if svc.running else ""
        readings = [
            line
            for line in text.splitlines()
            if line.startswith(("sensorwatch_readings_total", "sensorwatch_queue"))
        ]
        raise AssertionError(f"{exc}; {got}; {readings}; log tail:\n{svc.log_tail(3000)}") from None


def _rejections(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for (name, labels), value in parse_metrics(text).items():
        if name == "sensorwatch_rejections_total" and value:
            out[dict(labels)["reason"]] += int(value)
    return out


def _scored(text: str) -> int:
    for (name, labels), value in parse_metrics(text).items():
        if name == "sensorwatch_readings_total" and dict(labels) == {"source": "mqtt", "outcome": "scored"}:
            return int(value)
    return 0


def test_hostile_messages_among_good_readings_through_a_real_broker_and_a_restart(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    broker = private_broker
    env = {
        "SENSORWATCH_MQTT_URL": broker.url,
        "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
        "SENSORWATCH_TOPIC_READINGS": names.readings,
        "SENSORWATCH_TOPIC_PREFIX": names.prefix,
        "SENSORWATCH_STATE_DIR": str(tmp_path / "state"),
        "SENSORWATCH_PUBLISH_SCORES": "true",
        "SENSORWATCH_MAX_REQUEST_READINGS": str(MAX_READINGS),
        "SENSORWATCH_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
    }
    collector = Collector(names.prefix, broker.host, broker.port)
    publisher = Publisher(broker.host, broker.port)
    not_ready: list[tuple[float, int | str]] = []
    polling = threading.Event()
    try:
        with ServiceProcess(env, tmp_path) as svc:

            def poll() -> None:
                while polling.is_set():
                    try:
                        code: int | str = httpx.get(svc.url + "/readyz", timeout=5).status_code
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    if code != 200 and polling.is_set():
                        not_ready.append((time.monotonic(), code))
                    time.sleep(0.2)

            svc.start()
            svc.wait_ready(60)
            polling.set()
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()

            # Part 1: the service runs.
            feed = Feed(names, publisher)
            started = time.monotonic()
            feed.run(N_FIRST, base_seed=1)
            publisher.wait_acked(120)
            dead_1, good_1 = feed.expected_dead, len(feed.good)
            _wait_outcomes(collector, svc, good_1, dead_1, 300)
            part1_s = time.monotonic() - started
            metrics_1 = svc.metrics()
            polling.clear()
            poller.join()
            assert svc.stop() == 0

            # Part 2: published while the service is down, then it starts again.
            feed.run(N_QUEUED, base_seed=2)
            publisher.wait_acked(60)
            svc.start()
            svc.wait_ready(60)
            polling.set()
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            dead_all, good_all = feed.expected_dead, len(feed.good)
            _wait_outcomes(collector, svc, good_all, dead_all, 120)
            time.sleep(1.0)  # anything extra (a duplicate) would arrive now
            metrics_2 = svc.metrics()
            polling.clear()
            poller.join()
            log = svc.log_text()
    finally:
        polling.clear()
        publisher.close()
        collector.close()

    print(
        f"\n{len(feed.sent)} hostile messages ({dict(feed.kinds)}) among {good_all} good readings; "
        f"part 1 took {part1_s:.1f} s; {dead_all} dead letters, all received"
    )
    # Every good reading scored exactly once.
    scores = collector.docs("scores")
    keys = [(s["device_id"], s["ts"]) for s in scores]
    assert len(keys) == len(set(keys)), "a reading was scored twice"
    assert len(feed.sent) == N_FIRST + N_QUEUED
    assert sorted(keys) == sorted(feed.good)
    assert all(s["accepted"] for s in scores)
    # Every hostile message dead-lettered as often as it must be, with a reason.
    dead = collector.docs("deadletter")
    assert len(dead) == dead_all
    assert len({d["event_id"] for d in dead}) == len(dead)
    reasons = Counter(d["reason"] for d in dead)
    assert set(reasons) <= set(REJECT_REASONS), reasons
    assert "internal_error" not in reasons
    assert all(d["detail"] for d in dead)
    # The metrics agree with what was published, reason by reason (counters restart with the process).
    dead_part1 = Counter(d["reason"] for d in dead[:dead_1])
    assert _rejections(metrics_1) == dead_part1
    assert _scored(metrics_1) == good_1
    assert _rejections(metrics_2) == reasons - dead_part1
    assert _scored(metrics_2) == good_all - good_1
    # Ready throughout, and no traceback.
    assert not_ready == []
    assert "Traceback" not in log
