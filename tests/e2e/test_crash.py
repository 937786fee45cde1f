"""Crashes during a QoS1 stream: the service killed with ``SIGKILL`` (three times), the broker restarted
gracefully, the broker killed.

A reading's identity is ``(device_id, ts)``. Its *outcome* is a score on ``PREFIX/scores/<dev>`` or a
dead letter on ``PREFIX/deadletter``. The reference run scores the same stream without interruption;
after crashes, every reading must still have exactly one distinct outcome (copies are allowed only as
re-publications: same ``event_id``, marked ``replayed``) and it must be the reference's — a reading lost
from the device state, or applied twice, shifts every later score of its device.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.e2e.harness import Broker, Collector, Names, Publisher, new_names, publish_paced
from tests.e2e.procs import ServiceProcess
from tests.support import metric, wait_until

T0 = 1_767_225_600.0
#: The scorer's warm-up is 64 readings per device (ScorerConfig.warmup: nothing is flagged before) and the
#: range check arms at 300 (range_warmup: never here). The likelihood of a 10-reading short-term mean
#: needs a disturbance that lasts: devices ``d % 5 == 0`` get a 6-reading oscillation burst at 90…110
#: (flagged: ~9 events with this seed), ``d % 5 == 1`` one large spike, ``d % 10 == 3`` a level shift.
N_DEVICES, N_READINGS = 50, 120
MIN_EVENTS = 5
TOL = 1e-5
BAD_REASONS = ("duplicate_timestamp", "out_of_order")
#: When the service is killed: once this fraction of the stream is *published* (the service is behind,
#: scoring the burst: readings received, not yet logged) or *scored* (half a burst's outcomes out: a
#: batch logged whose outputs are not all published yet — published again after the restart).
KILLS = ((0.25, "published"), (0.50, "scored"), (0.75, "published"))
#: Readings published while the service is down (the broker queues them for its persistent session).
DOWNTIME_READINGS = 300
WINDOW = 400
#: The feed publishes bursts of BURST readings, RATE readings/s on average: the stream lasts ~17 s, so that
#: the service's periodic snapshots (every SNAPSHOT_S) happen between the kills (which come at least
#: SNAPSHOT_S + 0.5 s after a start), and a kill tends to come while a burst is being scored.
RATE, BURST = 350, 250
SNAPSHOT_S = 2
SHOW = 5

Key = tuple[str, float]


# -------------------------------------------------------------------------------------------- the stream
def device_values(d: int, n: int = N_READINGS) -> np.ndarray:
    rng = np.random.default_rng(1000 + d)
    k = np.arange(n)
    x = 20.0 + d % 7 + 0.5 * np.sin(2 * np.pi * k / 60) + rng.normal(0.0, 0.1, n)
    if d % 5 == 0:
        at = int(rng.integers(3 * n // 4, n - 10))
        x[at : at + 6] += 4.0 * np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    if d % 5 == 1:
        x[int(rng.integers(5 * n // 8, n - 10))] += 5.0
    if d % 10 == 3:
        x[4 * n // 5 :] += 4.0
    return x


def device_id(d: int) -> str:
    return f"c-{d:02d}"


def stream(names: Names, devices: int = N_DEVICES, readings: int = N_READINGS) -> list[tuple[str, Any]]:
    """One reading per message, round-robin over the devices (as a fleet publishes)."""
    values = [device_values(d, readings) for d in range(devices)]
    return [
        (names.topic(device_id(d)), {"ts": T0 + k, "values": [float(values[d][k])]})
        for k in range(readings)
        for d in range(devices)
    ]


def stream_keys(devices: int = N_DEVICES, readings: int = N_READINGS) -> set[Key]:
    return {(device_id(d), T0 + k) for k in range(readings) for d in range(devices)}


def service_env(broker: Broker, names: Names, root: Path) -> dict[str, str]:
    return {
        "SENSORWATCH_MQTT_URL": broker.url,
        "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
        "SENSORWATCH_TOPIC_READINGS": names.readings,
        "SENSORWATCH_TOPIC_PREFIX": names.prefix,
        "SENSORWATCH_STATE_DIR": str(root / "state"),
        "SENSORWATCH_MODELS_DIR": str(root / "models"),
        "SENSORWATCH_PUBLISH_SCORES": "true",
        "SENSORWATCH_SNAPSHOT_INTERVAL_S": str(SNAPSHOT_S),
        "SENSORWATCH_MODEL": "builtin",
    }


# -------------------------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """What one score or dead-letter message says about one reading."""

    accepted: bool
    reason: str | None = None
    likelihood: float | None = None
    raw_score: float | None = None
    event_id: str | None = None
    replayed: bool = False

    def same(self, other: Outcome) -> bool:
        """Same result (event ids aside): accepted/reason equal, likelihood and raw score within TOL."""
        return (
            self.accepted == other.accepted
            and self.reason == other.reason
            and _close(self.likelihood, other.likelihood)
            and _close(self.raw_score, other.raw_score)
        )

    def __str__(self) -> str:
        what = f"L={self.likelihood:.7f} raw={self.raw_score:.7f}" if self.accepted else f"dead:{self.reason}"
        return f"{what} id={self.event_id}{' replayed' if self.replayed else ''}"


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=0.0, abs_tol=TOL)


def _dead_key(doc: dict[str, Any]) -> Key | None:
    """A dead letter's reading: its device_id and ts, else (a whole message refused) its payload's ts."""
    ts = doc.get("ts")
    if ts is None:
        try:
            ts = json.loads(doc.get("payload", "")).get("ts")
        except (ValueError, AttributeError):
            return None
    device = doc.get("device_id")
    return None if device is None or ts is None else (device, float(ts))


def outcomes(collector: Collector) -> dict[Key, list[Outcome]]:
    """Every outcome message received, by reading, in arrival order."""
    out: dict[Key, list[Outcome]] = defaultdict(list)
    for s in collector.docs("scores"):
        out[(s["device_id"], float(s["ts"]))].append(
            Outcome(
                bool(s["accepted"]),
                s.get("reason"),
                s.get("likelihood"),
                s.get("raw_score"),
                s.get("event_id"),
                bool(s.get("replayed", False)),
            )
        )
    for d in collector.docs("deadletter"):
        key = _dead_key(d)
        if key is not None:
            out[key].append(
                Outcome(False, d["reason"], None, None, d.get("event_id"), bool(d.get("replayed")))
            )
    return out


def distinct(copies: Iterable[Outcome]) -> list[Outcome]:
    """Copies deduplicated by event id and result."""
    kept: list[Outcome] = []
    for o in copies:
        if not any(k.event_id == o.event_id and k.same(o) for k in kept):
            kept.append(o)
    return kept


def event_ids(collector: Collector) -> set[str]:
    """Anomaly events deduplicated by event id (``<no event_id> dev@ts`` for those without one)."""
    return {
        a.get("event_id") or f"<no event_id> {a['device_id']}@{a['ts']}" for a in collector.docs("anomalies")
    }


# -------------------------------------------------------------------------------------------- a run
@dataclass
class Run:
    """What a run left: outcomes by reading, anomaly event ids, dead letters, notes for the report."""

    label: str
    outcomes: dict[Key, list[Outcome]]
    events: set[str]
    dead: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, label: str, collector: Collector, notes: list[str]) -> Run:
        return cls(label, outcomes(collector), event_ids(collector), collector.docs("deadletter"), notes)

    def summary(self) -> str:
        copies = sum(len(v) for v in self.outcomes.values())
        reasons = Counter(d["reason"] for d in self.dead)
        return (
            f"run {self.label}: {len(self.outcomes)} readings with an outcome, {copies} outcome messages, "
            f"{len(self.events)} anomaly events, dead letters {dict(reasons)}; " + "; ".join(self.notes)
        )


class Feed:
    """Publishes a stream on a thread. *Paced*: in bursts of BURST readings, RATE readings/s on average,
    at most WINDOW readings ahead of the outcomes seen. While the service is down
    (:meth:`publish_while_down`): a given number more, at once, whatever the outcomes. *Held*
    (:meth:`park`: the broker is about to go away, a publish would fail): nothing."""

    def __init__(self, publisher: Publisher, messages: list[tuple[str, Any]], collector: Collector) -> None:
        self.publisher, self.messages, self.collector = publisher, messages, collector
        # ("paced", readings published when the pacing (re)started, its time) | ("down", up to) | ("held",)
        self._mode: tuple[Any, ...] = ("held",)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-feed", daemon=True)

    def _progress(self) -> int:
        """What publish_paced compares with: it publishes while ``published - progress < WINDOW``."""
        mode = self._mode
        if mode[0] == "down":
            return int(mode[1]) - WINDOW
        if mode[0] == "held":
            return -(10**9)
        bursts = int((time.monotonic() - mode[2]) * RATE / BURST) + 1
        return min(mode[1] + BURST * bursts - WINDOW, self.collector.outcomes())

    def _run(self) -> None:
        try:
            publish_paced(self.publisher, self.messages, self._progress, window=WINDOW, timeout=240)
        except BaseException as exc:  # reported by join()
            self.error = exc

    @property
    def published(self) -> int:
        return self.publisher.published

    def start(self) -> None:
        self.resume()
        self.thread.start()

    def resume(self) -> None:
        """Paced again, the bursts counted from now (no catching up for the time it was down or held)."""
        self._mode = ("paced", self.published, time.monotonic())

    def publish_while_down(self, readings: int) -> int:
        """Publish ``readings`` more now; returns the count to wait for (the stream may end first)."""
        want = min(len(self.messages), self.published + readings)
        self._mode = ("down", want)
        return want

    def park(self) -> None:
        """Stop publishing and wait until the broker has acknowledged everything published."""
        self._mode = ("held",)
        last = -1
        while last != self.published:  # a publish that had passed the check a moment ago
            last = self.published
            time.sleep(0.02)
        self.publisher.wait_acked()

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the feed is stuck after {self.published} readings"
        if self.error is not None:
            raise AssertionError(f"the feed failed after {self.published} readings: {self.error}")


class SessionCollector(Collector):
    """A :class:`Collector` that survives broker restarts: a persistent session (a graceful restart keeps
    its subscription and the messages queued meanwhile) and a subscription again on every connect (a
    broker killed with ``SIGKILL`` may have forgotten it). Same records, same accessors."""

    def __init__(self, prefix: str, host: str, port: int) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._messages = []
        self._counts = Counter()
        self.subacks = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"scol-{uuid.uuid4().hex[:12]}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_suback
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=30, properties=props)  # a clean start the first time only
        self.client.loop_start()
        wait_until(lambda: self.subacks >= 1, 10, "the collector's SUBACK")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            client.subscribe(f"{self.prefix}/#", qos=1)

    def _on_suback(self, client: paho.Client, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        self.subacks += 1


def wait_complete(collector: Collector, expected: set[Key], stall: float = 10.0) -> bool:
    """Wait until every expected reading has an outcome; False (reported later) once no new outcome
    came for ``stall`` seconds."""
    last, since = -1, time.monotonic()
    while not expected <= outcomes(collector).keys():
        if collector.outcomes() != last:
            last, since = collector.outcomes(), time.monotonic()
        elif time.monotonic() - since > stall:
            return False
        time.sleep(0.25)
    time.sleep(0.5)  # a late duplicate would arrive right behind
    return True


def finish(
    feed: Feed, collector: Collector, expected: set[Key], svc: ServiceProcess, notes: list[str]
) -> dict[str, float]:
    """The whole stream published and acked; every reading's outcome in (or the time is up); graceful stop."""
    feed.join()
    feed.publisher.wait_acked()
    if not wait_complete(collector, expected):
        notes.append("gave up waiting for every reading's outcome (none for 10 s)")
    m = svc.metrics()
    counted = {
        o: metric(m, "sensorwatch_readings_total", source="mqtt", outcome=o) for o in ("scored", "rejected")
    }
    notes.append(f"the last process counted mqtt readings {counted}")
    rc = svc.stop()
    notes.append(f"graceful stop exit code {rc}")
    assert rc == 0, f"graceful stop exited with {rc}:\n{svc.log_tail()}"
    return counted


# -------------------------------------------------------------------------------------------- checks
def problem(title: str, items: list[Any]) -> list[str]:
    if not items:
        return []
    first = "\n    ".join(str(i) for i in items[:SHOW])
    return [f"{title}: {len(items)} (first {min(SHOW, len(items))}):\n    {first}"]


def check_complete(run: Run, expected: set[Key]) -> list[str]:
    missing = sorted(expected - run.outcomes.keys())
    extra = sorted(run.outcomes.keys() - expected)
    return problem(f"run {run.label}: readings without any outcome", missing) + problem(
        f"run {run.label}: outcomes of readings never published", extra
    )


def check_no_double_application(run: Run) -> list[str]:
    """No dead letter of a redelivered reading, no reading with two different results."""
    bad = [(d["reason"], d.get("device_id"), d.get("ts")) for d in run.dead if d["reason"] in BAD_REASONS]
    conflicting = [
        (key, [str(o) for o in copies])
        for key, copies in sorted(run.outcomes.items())
        if any(not o.same(copies[0]) for o in copies)
    ]
    return problem(f"run {run.label}: dead letters {BAD_REASONS} (a reading applied twice)", bad) + problem(
        f"run {run.label}: readings with different results (applied twice?)", conflicting
    )


def check_republications(run: Run) -> list[str]:
    """Copies only as re-publications: every message has an event id, one per reading; all but one
    copy of a reading are marked ``replayed``."""
    copies = [(key, o) for key, cs in sorted(run.outcomes.items()) for o in cs]
    no_id = [(key, str(o)) for key, o in copies if o.event_id is None]
    several = [
        (key, sorted({str(o.event_id) for o in cs}))
        for key, cs in sorted(run.outcomes.items())
        if len({o.event_id for o in cs}) > 1
    ]
    unmarked = [
        (key, [str(o) for o in cs])
        for key, cs in sorted(run.outcomes.items())
        if sum(not o.replayed for o in cs) > 1
    ]
    return (
        problem(f"run {run.label}: outcome messages without event_id", no_id)
        + problem(f"run {run.label}: readings with several event_ids", several)
        + problem(f"run {run.label}: readings with copies not marked replayed", unmarked)
    )


def check_same_as(run: Run, ref: Run) -> list[str]:
    """Every reading's outcome equals the reference's, and so do the anomaly events."""
    differ = []
    for key in sorted(ref.outcomes.keys() & run.outcomes.keys()):
        want = ref.outcomes[key][0]
        wrong = [o for o in distinct(run.outcomes[key]) if not o.same(want)]
        if wrong:
            differ.append(f"{key}: run {ref.label} {want} | run {run.label} {'; '.join(map(str, wrong))}")
    return (
        problem(f"readings whose outcome in run {run.label} differs from run {ref.label}", differ)
        + problem(
            f"anomaly events of run {ref.label} missing in run {run.label}", sorted(ref.events - run.events)
        )
        + problem(
            f"anomaly events of run {run.label} not in run {ref.label}", sorted(run.events - ref.events)
        )
    )


def check_reference(run: Run, expected: set[Key]) -> None:
    """The uninterrupted run is the yardstick: complete, once each, no dead letter, some events."""
    problems = check_complete(run, expected) + problem(
        "run A: readings with more than one outcome message",
        [k for k, v in sorted(run.outcomes.items()) if len(v) > 1],
    )
    problems += problem(
        "run A: dead letters", [(d["reason"], d.get("device_id"), d.get("ts")) for d in run.dead]
    )
    if len(run.events) < MIN_EVENTS:
        problems.append(
            f"run A: only {len(run.events)} anomaly events (< {MIN_EVENTS}): the comparison is vacuous"
        )
    assert not problems, run.summary() + "\n" + "\n".join(problems)


# -------------------------------------------------------------------------------------------- runs
def clients(broker: Broker, names: Names) -> tuple[Collector, Publisher]:
    return Collector(names.prefix, broker.host, broker.port), Publisher(broker.host, broker.port)


def run_reference(broker: Broker, root: Path) -> Run:
    """Run A: one service process, the whole stream, a graceful stop."""
    names = new_names()
    collector, publisher = clients(broker, names)
    notes: list[str] = []
    try:
        with ServiceProcess(service_env(broker, names, root), root, name="service-a") as svc:
            svc.start()
            notes.append(f"ready in {svc.wait_ready():.1f} s")
            started = time.monotonic()
            feed = Feed(publisher, stream(names), collector)
            feed.start()
            finish(feed, collector, stream_keys(), svc, notes)
            notes.append(f"stream scored in {time.monotonic() - started:.1f} s")
    finally:
        publisher.close()
        collector.close()
    return Run.of("A", collector, notes)


def state_files(svc: ServiceProcess) -> str:
    d = Path(svc.env["SENSORWATCH_STATE_DIR"])
    files = sorted(d.rglob("*")) if d.is_dir() else []
    return ", ".join(f"{f.relative_to(d)} {f.stat().st_size} B" for f in files if f.is_file()) or "none"


def crash_and_restart(
    svc: ServiceProcess, feed: Feed, kill: tuple[float, str], ready_at: float, notes: list[str]
) -> float:
    """Once the point of ``kill`` (see KILLS) is reached and a periodic snapshot is due: ``SIGKILL``;
    readings go on being published (the broker queues them for the session); restart. Returns when it
    is ready again."""
    fraction, what = kill
    target = int(fraction * len(feed.messages)) + (BURST // 2 if what == "scored" else 0)
    count = feed.collector.outcomes if what == "scored" else (lambda: feed.published)

    def due() -> bool:
        return count() >= target and time.monotonic() - ready_at >= SNAPSHOT_S + 0.5

    wait_until(due, 60, f"{target} readings {what}", interval=0.001)
    svc.kill9()
    at, seen = feed.published, feed.collector.outcomes()
    files = state_files(svc)
    want = feed.publish_while_down(DOWNTIME_READINGS)
    wait_until(lambda: feed.published >= want, 30, f"{want} readings published while the service is down")
    svc.start()
    ready = svc.wait_ready()
    feed.resume()
    notes.append(f"killed at {seen} outcomes / {at} published (state: {files}), ready again in {ready:.1f} s")
    return time.monotonic()


def restores(svc: ServiceProcess) -> list[str]:
    """What each start said it restored (the service logs ``restored state of N devices``)."""
    return [ln[ln.index("restored") :] for ln in svc.log_text().splitlines() if "restored" in ln]


def run_with_crashes(broker: Broker, root: Path) -> Run:
    """Run B: the same stream; the service killed three times on the way, restarted on its state dir."""
    names = new_names()
    collector, publisher = clients(broker, names)
    messages = stream(names)
    notes: list[str] = []
    try:
        with ServiceProcess(service_env(broker, names, root), root, name="service-b") as svc:
            svc.start()
            svc.wait_ready()
            ready_at = time.monotonic()
            feed = Feed(publisher, messages, collector)
            feed.start()
            for kill in KILLS:
                ready_at = crash_and_restart(svc, feed, kill, ready_at, notes)
            finish(feed, collector, stream_keys(), svc, notes)
            notes.append(f"restores: {restores(svc)}")
    finally:
        publisher.close()
        collector.close()
    return Run.of("B", collector, notes)


@pytest.mark.slow
def test_kill9_three_times_during_a_qos1_stream_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path, private_broker: Broker
) -> None:
    """The service is killed (``SIGKILL``) at ~25 %, ~50 % and ~75 % of a 6,000-reading QoS1 stream and
    restarted on the same state dir and client id. Every reading must end up with exactly one distinct
    outcome, the uninterrupted run's, and the same anomaly events (see the module docstring)."""
    expected = stream_keys()
    ref = run_reference(private_broker, tmp_path / "a")
    print("\n" + ref.summary())
    check_reference(ref, expected)
    run = run_with_crashes(private_broker, tmp_path / "b")
    print(run.summary())
    problems = (
        check_complete(run, expected)
        + check_no_double_application(ref)
        + check_no_double_application(run)
        + check_republications(run)
        + check_same_as(run, ref)
    )
    assert not problems, run.summary() + "\n" + "\n".join(problems)


# -------------------------------------------------------------------------------------------- the broker
BROKER_DEVICES, BROKER_READINGS = 20, 100


def bounce(broker: Broker, kill: bool) -> None:
    """Stop the broker (``SIGTERM``: it saves its state; ``SIGKILL``: it does not) and start it again."""
    if kill:
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait(10)
    else:
        broker.stop()
    broker.start()


def reconnected(
    svc: ServiceProcess, publisher: Publisher, collector: SessionCollector, subacks: int
) -> float:
    """Wait for the service (a reconnect counted, ready), the publisher and the collector (subscribed
    again); returns the seconds it took."""
    started = time.monotonic()
    wait_until(
        lambda: metric(svc.metrics(), "sensorwatch_mqtt_reconnects_total") >= 1, 40, "service reconnect"
    )
    svc.wait_ready(40)
    wait_until(publisher.client.is_connected, 20, "publisher reconnect")
    wait_until(lambda: collector.subacks > subacks, 20, "collector subscribed again")
    return time.monotonic() - started


def restart_broker_mid_stream(
    broker: Broker, root: Path, kill: bool
) -> tuple[Run, set[Key], dict[str, float]]:
    """One service; the broker stopped (``SIGTERM``, or ``SIGKILL`` when ``kill``) and started again
    on the same port while readings are in flight. Returns the run and the readings published after."""
    names = new_names()
    messages = stream(names, BROKER_DEVICES, BROKER_READINGS)
    collector = SessionCollector(names.prefix, broker.host, broker.port)
    publisher = Publisher(broker.host, broker.port)
    notes: list[str] = []
    try:
        with ServiceProcess(service_env(broker, names, root), root) as svc:
            svc.start()
            svc.wait_ready()
            feed = Feed(publisher, messages, collector)
            feed.start()
            # Right after a burst was published, the service is still scoring it: readings in flight.
            half = len(messages) // 2  # the end of a burst
            wait_until(lambda: feed.published >= half, 60, f"{half} published", interval=0.001)
            feed.park()
            seen, subacks = collector.outcomes(), collector.subacks
            bounce(broker, kill)
            time_up = reconnected(svc, publisher, collector, subacks)
            after = feed.published
            what = "killed" if kill else "stopped"
            notes.append(f"broker {what} at {seen} outcomes / {after} published, up again in {time_up:.1f} s")
            feed.resume()
            counted = finish(feed, collector, keys_of(messages[after:]), svc, notes)
    finally:
        publisher.close()
        collector.close()
    run = Run.of("broker-kill" if kill else "broker-restart", collector, notes)
    return run, keys_of(messages[after:]), counted


def keys_of(messages: list[tuple[str, Any]]) -> set[Key]:
    return {(topic.split("/")[1], float(doc["ts"])) for topic, doc in messages}


def check_scored(run: Run, keys: set[Key]) -> list[str]:
    unscored = sorted(k for k in keys if not any(o.accepted for o in run.outcomes.get(k, [])))
    return problem(f"run {run.label}: readings published after the restart and not scored", unscored)


def check_one_outcome(run: Run) -> list[str]:
    """Copies of an outcome (a QoS1 resend) are fine; two different outcomes of one reading are not."""
    several = [(k, [str(o) for o in v]) for k, v in sorted(run.outcomes.items()) if len(distinct(v)) > 1]
    return problem(f"run {run.label}: readings with more than one distinct outcome", several)


def test_graceful_broker_restart_mid_stream_every_reading_scored_once(
    tmp_path: Path, private_broker: Broker
) -> None:
    """Mosquitto stopped gracefully (it writes its persistence file: sessions, subscriptions, queued and
    in-flight QoS1 messages) and started again while readings are in flight: every reading is scored
    exactly once (a message the service had scored but could not ack is redelivered flagged DUP and
    acked without being scored again) and no reading has two different results.

    Documented limitation, measured: outcome messages the service publishes (QoS1) in the second around
    the restart do not all reach a subscriber — 49 of 2,000 in one run. The same loss shows with a bare
    paho 2.2 publisher and subscriber through a graceful Mosquitto 2.0.11 restart, without sensorwatch
    (0 to 231 of 900 messages lost in five runs): it is below the service, so this test counts those
    readings and reports them, but requires the service's own counts to be exact.
    """
    run, _, counted = restart_broker_mid_stream(private_broker, tmp_path, kill=False)
    lost = stream_keys(BROKER_DEVICES, BROKER_READINGS) - run.outcomes.keys()
    print(
        "\n" + run.summary() + f"\noutcome messages lost between the service and the collector: {len(lost)}"
    )
    problems = check_no_double_application(run) + check_one_outcome(run)
    total = BROKER_DEVICES * BROKER_READINGS
    if counted != {"scored": total, "rejected": 0}:
        problems.append(f"the service counted {counted}, not {total} readings scored once each")
    assert not problems, run.summary() + "\n" + "\n".join(problems)


def test_broker_kill9_mid_stream_nothing_applied_twice_and_the_service_recovers(
    tmp_path: Path, private_broker: Broker
) -> None:
    """Mosquitto killed (``SIGKILL``) while readings are in flight, then started again.

    Documented limitation: Mosquitto 2.0 writes its persistence file only every ``autosave_interval``
    (30 min by default) and at a graceful shutdown, so after a kill it forgets what it held since —
    here everything: the sessions, their subscriptions and the QoS1 readings it had already acknowledged
    to the publisher but not yet delivered (or whose delivery the service had not yet acked). Those
    readings are lost, and nothing the service can do brings them back (a broker that must not lose
    acknowledged messages needs ``autosave_on_changes``/a cluster). So this asserts only what the
    service owes: no reading applied twice (no ``duplicate_timestamp``/``out_of_order`` dead letter, no
    reading with two different results) and recovery — it reconnects, subscribes again, is ready, and
    every reading published after the restart is scored.
    """
    run, after, _ = restart_broker_mid_stream(private_broker, tmp_path, kill=True)
    print("\n" + run.summary())
    lost = stream_keys(BROKER_DEVICES, BROKER_READINGS) - run.outcomes.keys()
    print(f"readings without an outcome (lost by the broker or while the collector was away): {len(lost)}")
    problems = check_scored(run, after) + check_no_double_application(run) + check_one_outcome(run)
    assert not problems, run.summary() + "\n" + "\n".join(problems)
