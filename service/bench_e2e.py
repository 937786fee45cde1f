"""``sensorwatch bench e2e``: readings/s from a broker queue to an outcome, the service versus a bare
consumer, and the latency of live readings at half the service's maximum rate.

Everything runs against a private Mosquitto on a free port (queues large enough that nothing is
dropped). Each workload — one reading per message, and 50-reading gateway messages — is measured
``runs`` times, each run in its own topic namespace (no session ever sees another run's messages):

* **Bare consumer**: a plain paho client that only parses each message with orjson and counts its
  readings. It subscribes once (persistent session) and disconnects; all N messages are published
  while it is away, so they queue in the broker; it then reconnects and the clock runs from the
  connect call to the last reading counted (the CONNECT handshake is inside the window: the bare
  figure is, if anything, flattered downwards).
* **The service**: ``sensorwatch serve`` as a subprocess, started once until ``/readyz`` is 200 so
  its persistent session exists, stopped gracefully (SIGTERM), then the same N messages are queued
  while it is away and it is started again (same client id and state dir).

How the service's window is kept honest: process start-up (imports, model load, state restore, the
MQTT connect) is not a cost of scoring, so the clock does not start with the process. ``/metrics`` is
polled every 50 ms; the window opens at the first poll whose ``sensorwatch_readings_total{source=
"mqtt"}`` (all outcomes) is above 0 and closes at the first poll that reaches N. Readings counted
before the window opened are subtracted from the numerator, so the rate is (readings inside the
window) / (window length) — nothing that happened before the first poll is credited to it. The
window closes up to one poll interval after the last outcome, which can only lower the rate. Each
poll is stamped at the middle of its HTTP request. The result records ``window_fraction``, the share
of the N readings inside the window (a small share means start-up overlapped most of the drain:
use more ``--messages``). The service's CPU time (utime + stime of /proc/PID/stat, all threads) is
read at both ends of the same window; it includes serving the /metrics polls (about 1.6 ms of
service CPU each on a 2-core test machine: some 3 % of a core at 20 polls/s, which also lowers the
measured rate a little).

Latency, two ways, each with one-reading messages published live by a paced publisher in a process
of its own (MQTT 3.1.1: the cheaper client on the shared cores; the broker delivers to the service
in the service's version) and a subscriber in this process. The latency of a reading is the arrival
of its outcome minus the moment its message was handed to the publishing client
(``time.perf_counter``, CLOCK_MONOTONIC: one clock for every process of the machine; keyed by
``(device, ts)``); the first second is a warm-up and is not counted.

1. **The service as configured** (scores not published), at half (``--latency-fraction``) of its
   median one-reading maximum from the drains above, ``runs`` times (medians reported): one message
   in ``PROBE_EVERY`` is a probe, a reading the engine refuses per reading, whose dead letter is
   published where the outcomes of its batch are released (``with_probes``).
2. **Every score published** (``SENSORWATCH_PUBLISH_SCORES=true``), once, at half of the maximum
   *in that configuration* (one more drain: publishing every score costs more than scoring).

The bench's processes, the broker and the service share the machine's cores: on a small machine the
figures include that contention (the publisher alone takes about half a core at 14,000 messages/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import multiprocessing
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.parser import text_string_to_metric_families

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HOST = "127.0.0.1"
#: QoS1 messages in flight to a consumer: the broker's max_inflight_messages (MQTT 3.1.1 clients) and
#: the bare consumer's Receive Maximum (MQTT 5) — the service asks for the same 1000, so both
#: consumers get the same window and the broker never throttles one of them more than the other.
INFLIGHT = 1000
#: Receive Maximum of the score subscriber of the latency run: it must never be the bottleneck.
SUBSCRIBER_RECEIVE_MAXIMUM = 65535
SESSION_EXPIRY_S = 3600
GATEWAY_BATCH = 50
TS0 = 1_700_000_000.0
INTERVAL_S = 60.0  # simulated seconds between a device's readings (integral: exact float keys)
POLL_S = 0.05
#: /metrics restricted to the two families :func:`read_metrics` reads: a full scrape costs the service
#: ~6 ms of its event loop (prometheus_client formats every series), 12 % of it at this poll rate;
#: measured, a third of a cluster worker's busy event loop during a gateway drain went to the bench's
#: own scrapes. Both services are polled the same way.
PROGRESS_PATH = "/metrics?name[]=sensorwatch_readings_total&name[]=sensorwatch_model_info"
READY_TIMEOUT_S = 90.0
STALL_S = 30.0  # a drain or wait that makes no progress this long is a failure, not slowness
MAX_WAIT_S = 600.0
LATENCY_WARMUP_S = 1.0
#: The paced publisher's MQTT version, whatever the service's: the broker delivers to the service in
#: the service's own version either way, and a 3.1.1 publish costs the load generator less CPU on the
#: cores it shares with the service (no properties to build).
PUBLISHER_PROTOCOL = "3.1.1"
#: In the probe latency run, one message in this many is a probe (see ``with_probes``).
PROBE_EVERY = 20
#: Settings the bench sets itself: an ``--env`` override of one would break the measurement.
RESERVED_ENV = (
    "SENSORWATCH_MQTT_URL",
    "SENSORWATCH_MQTT_CLIENT_ID",
    "SENSORWATCH_MQTT_PROTOCOL",
    "SENSORWATCH_TOPIC_READINGS",
    "SENSORWATCH_TOPIC_PREFIX",
    "SENSORWATCH_STATE_DIR",
    "SENSORWATCH_ADMIN_TOKEN",
    "SENSORWATCH_PUBLISH_SCORES",
)

Message = tuple[str, bytes, str, float]  # topic, payload, device id, ts of its first reading


class BenchError(RuntimeError):
    """The bench could not measure (a process died, a broker dropped messages, a wait timed out)."""


@dataclass(frozen=True)
class Workload:
    name: str
    devices: int
    messages: int
    batch: int  # readings per message

    @property
    def readings(self) -> int:
        return self.messages * self.batch


@dataclass(frozen=True)
class Options:
    workloads: tuple[Workload, ...]
    runs: int
    protocol: str
    model: str | None
    env: dict[str, str]
    latency_s: float
    latency_fraction: float
    json_out: str | None


# ---------------------------------------------------------------------------------------- workload
def make_messages(w: Workload, ns: str, seed: int = 0) -> list[Message]:
    """N messages round-robin over the devices: a noisy daily sine, ts strictly increasing per device.

    Built before any clock runs (serialising is not part of what is measured).
    """
    noise = 0.1 * np.random.default_rng(seed).standard_normal(w.readings)
    out: list[Message] = []
    for k in range(w.messages):
        d = k % w.devices
        first = (k // w.devices) * w.batch  # the device's reading index of this message's first reading
        rows = []
        for j in range(w.batch):
            i = first + j
            value = 10.0 + 3.0 * np.sin(2 * np.pi * i / 1440 + d) + noise[k * w.batch + j]
            rows.append({"ts": TS0 + i * INTERVAL_S, "values": [round(float(value), 4)]})
        doc = rows[0] if w.batch == 1 else {"readings": rows}
        device = f"d{d:05d}"
        out.append((f"{ns}/{device}/readings", orjson.dumps(doc), device, TS0 + first * INTERVAL_S))
    return out


# ------------------------------------------------------------------------------------------ broker
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def private_broker(workdir: Path, timeout: float = 15.0) -> Iterator[int]:
    """A private Mosquitto on a free port (its port), killed when the block ends."""
    port = free_port()
    lines = [
        f"listener {port} {HOST}",
        "allow_anonymous true",
        "persistence false",
        # Every message of a run is queued for an absent consumer: the default (1000) would drop most.
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        f"max_inflight_messages {INFLIGHT}",
        "log_type error",
        "log_type warning",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to 'mosquitto', who cannot read the temp dir
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    with open(workdir / "mosquitto.log", "ab") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        deadline = time.monotonic() + timeout
        while not _port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"mosquitto did not start: {_tail(workdir / 'mosquitto.log')}")
            time.sleep(0.05)
        yield port
    finally:
        _end(proc, 10.0)


def _end(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def mosquitto_version() -> str:
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).splitlines()[0].removeprefix("mosquitto version ").strip()


# -------------------------------------------------------------------------------------------- MQTT
def _client(client_id: str, protocol: str, *, persistent: bool) -> paho.Client:
    v5 = protocol == "5"
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
    )


def _connect(
    client: paho.Client,
    port: int,
    protocol: str,
    *,
    fresh: bool = True,
    receive_maximum: int = INFLIGHT,
    expiry_s: int = SESSION_EXPIRY_S,
    timeout: float = 10.0,
) -> None:
    """Connect and start the network loop; with ``fresh=False`` the broker must still hold the session
    (else the queued messages are gone and the measurement would be of nothing)."""
    connected = threading.Event()
    present: list[bool] = []

    def on_connect(c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            present.append(bool(flags.session_present))
            connected.set()

    client.on_connect = on_connect
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_maximum
        props.SessionExpiryInterval = expiry_s
        client.connect(HOST, port, keepalive=30, clean_start=fresh, properties=props)
    else:
        client.connect(HOST, port, keepalive=30)
    client.loop_start()
    if not connected.wait(timeout):
        _close(client)
        raise BenchError(f"MQTT client could not connect to {HOST}:{port}")
    if not fresh and not present[0]:
        _close(client)
        raise BenchError("the broker lost the consumer's session")


def _subscribe(client: paho.Client, topic: str, timeout: float = 10.0) -> None:
    acked = threading.Event()
    client.on_subscribe = lambda *a, **k: acked.set()
    client.subscribe(topic, qos=1)
    if not acked.wait(timeout):
        raise BenchError(f"no SUBACK for {topic}")


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


def publish_all(port: int, protocol: str, messages: Sequence[Message]) -> float:
    """Publish at QoS1 and wait for every PUBACK; seconds taken."""
    client = _client(f"bench-pub-{secrets.token_hex(4)}", protocol, persistent=False)
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)  # unbounded: publish() never refuses, the broker paces us
    _connect(client, port, protocol, expiry_s=0)
    try:
        t0 = time.perf_counter()
        infos = [client.publish(topic, payload, qos=1) for topic, payload, _, _ in messages]
        deadline = time.monotonic() + MAX_WAIT_S
        for info in infos:
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BenchError(f"publish failed: {paho.error_string(info.rc)}")
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            if not info.is_published():
                raise BenchError("the broker did not acknowledge every message")
        return time.perf_counter() - t0
    finally:
        _close(client)


class _ReadingCounter:
    """on_message of the bare consumer: parse, count readings, stamp the moment the last one arrives."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.t_last = 0.0
        self.done = threading.Event()

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        self.count += len(doc["readings"]) if "readings" in doc else 1
        if self.count >= self.expected and not self.done.is_set():
            self.t_last = time.perf_counter()
            self.done.set()


def wait_progress(done: Callable[[], bool], progress: Callable[[], float], what: str) -> None:
    """Wait until ``done()``; fail when ``progress()`` stalls for STALL_S or after MAX_WAIT_S."""
    start = last_change = time.monotonic()
    last = progress()
    while not done():
        now = time.monotonic()
        value = progress()
        if value != last:
            last, last_change = value, now
        if now - last_change > STALL_S or now - start > MAX_WAIT_S:
            raise BenchError(f"{what}: stuck at {last:,.0f}")
        time.sleep(POLL_S)


def bare_drain(port: int, protocol: str, w: Workload, ns: str) -> dict[str, Any]:
    """The bare consumer's drain of N queued messages (see module docstring)."""
    messages = make_messages(w, ns)
    client_id = f"bench-bare-{secrets.token_hex(4)}"
    client = _client(client_id, protocol, persistent=True)
    _connect(client, port, protocol, fresh=True)
    _subscribe(client, f"{ns}/+/readings")
    _close(client)
    publish_s = publish_all(port, protocol, messages)

    counter = _ReadingCounter(w.readings)
    client = _client(client_id, protocol, persistent=True)
    client.on_message = counter.on_message
    t0 = time.perf_counter()
    _connect(client, port, protocol, fresh=False)
    try:
        wait_progress(counter.done.is_set, lambda: counter.count, "bare consumer")
    finally:
        _close(client)
    seconds = counter.t_last - t0
    return {"readings_per_s": w.readings / seconds, "seconds": seconds, "publish_s": publish_s}


# ----------------------------------------------------------------------------------------- service
class ServiceProcess:
    """``sensorwatch serve`` as a subprocess; its log goes to ``log`` (appended across starts)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", HOST, "--port", str(self.port)]
        with open(self.log, "ab") as log:
            # Own session: a Ctrl-C of the bench reaches it only through stop() in a finally.
            self.proc = subprocess.Popen(  # noqa: S603
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self, timeout: float = 60.0) -> int | None:
        """Graceful stop (SIGTERM: the service drains and snapshots), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        rc = _end(self.proc, timeout)
        self.proc = None
        return rc

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"the service exited: {_tail(self.log)}")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes] | None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            got = self.get("/readyz")
            if got is not None and got[0] == 200:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the service was not ready within {timeout:.0f} s: {_tail(self.log)}")
            time.sleep(0.1)

    def cpu_s(self) -> float:
        """utime + stime of the process and of its running children (the MQTT intake process),
        every thread, in seconds."""
        assert self.proc is not None
        return sum(stat_cpu_s(Path(f"/proc/{pid}/stat")) for pid in process_tree(self.proc.pid))


def child_pids(pid: int) -> list[int]:
    """The running children of ``pid`` (from /proc/PID/task/TID/children)."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in children.read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += child_pids(p)
    return out


def stat_cpu_s(stat_path: Path) -> float:
    """utime + stime in seconds from a /proc/PID/stat or /proc/PID/task/TID/stat file (0: gone)."""
    try:
        stat = stat_path.read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    t: float  # perf_counter at the middle of the /metrics request
    outcomes: float  # sensorwatch_readings_total{source="mqtt"}, every outcome
    rejected: float
    cpu_s: float
    model: str


def read_metrics(text: str, source: str = "mqtt") -> tuple[float, float, str]:
    """(Readings of ``source`` with an outcome, of which rejected, the served model NAME/VERSION)."""
    outcomes = rejected = 0.0
    model = "?"
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "sensorwatch_readings_total" and s.labels.get("source") == source:
                outcomes += s.value
                rejected += s.value if s.labels.get("outcome") == "rejected" else 0.0
            elif s.name == "sensorwatch_model_info" and s.value == 1:
                model = f"{s.labels.get('name')}/{s.labels.get('version')}"
    return outcomes, rejected, model


def poll_until(svc: ServiceProcess, expected: int, source: str = "mqtt") -> list[Sample]:
    """/metrics every POLL_S until ``expected`` outcomes (bounded by stall and total timeouts)."""
    samples: list[Sample] = []
    start = last_change = time.monotonic()
    next_t = time.perf_counter()
    while not samples or samples[-1].outcomes < expected:
        svc.check_alive()
        t_a = time.perf_counter()
        got = svc.get(PROGRESS_PATH)
        t_b = time.perf_counter()
        if got is not None and got[0] == 200:
            outcomes, rejected, model = read_metrics(got[1].decode(), source)
            if not samples or outcomes != samples[-1].outcomes:
                last_change = time.monotonic()
            samples.append(Sample((t_a + t_b) / 2, outcomes, rejected, svc.cpu_s(), model))
        now = time.monotonic()
        if now - last_change > STALL_S or now - start > MAX_WAIT_S:
            got_n = samples[-1].outcomes if samples else 0
            raise BenchError(f"the service stalled at {got_n:,.0f} of {expected:,} readings")
        next_t += POLL_S
        time.sleep(max(0.0, next_t - time.perf_counter()))
    return samples


def window(samples: Sequence[Sample], expected: int) -> dict[str, Any]:
    """Rate and CPU per reading inside the honest window (see module docstring)."""
    first = next(s for s in samples if s.outcomes > 0)
    last = samples[-1]
    n = last.outcomes - first.outcomes
    if n <= 0 or last.t <= first.t:
        raise BenchError("the service drained everything before the first poll: use more --messages")
    return {
        "readings_per_s": n / (last.t - first.t),
        "seconds": last.t - first.t,
        "cpu_us_per_reading": 1e6 * (last.cpu_s - first.cpu_s) / n,
        "window_fraction": n / expected,
        "outcomes": int(last.outcomes),
        "rejected": int(last.rejected),
        "model": last.model,
    }


def service_env(opts: Options, broker_port: int, ns: str, state_dir: Path) -> dict[str, str]:
    """The caller's environment without its SENSORWATCH_* (they would change what is measured
    unseen), then the bench's settings, then ``--env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    env.update(
        SENSORWATCH_MQTT_URL=f"mqtt://{HOST}:{broker_port}",
        SENSORWATCH_MQTT_CLIENT_ID=f"bench-svc-{ns}",
        SENSORWATCH_MQTT_PROTOCOL=opts.protocol,
        SENSORWATCH_TOPIC_READINGS=f"{ns}/+/readings",
        SENSORWATCH_TOPIC_PREFIX=f"{ns}-out",
        SENSORWATCH_STATE_DIR=str(state_dir),
        SENSORWATCH_ADMIN_TOKEN=secrets.token_urlsafe(24),
    )
    if opts.model:
        env["SENSORWATCH_MODEL"] = opts.model
    env.update(opts.env)
    return env


def service_drain(opts: Options, broker_port: int, w: Workload, ns: str, workdir: Path) -> dict[str, Any]:
    """The service's drain of N queued messages (see module docstring)."""
    messages = make_messages(w, ns)
    workdir.mkdir(parents=True)
    svc = ServiceProcess(service_env(opts, broker_port, ns, workdir / "state"), workdir / "service.log")
    try:
        svc.start()
        svc.wait_ready()
        first_rc = svc.stop()
        publish_s = publish_all(broker_port, opts.protocol, messages)
        svc.start()
        samples = poll_until(svc, w.readings)
    finally:
        last_rc = svc.stop()
    return {**window(samples, w.readings), "publish_s": publish_s, "exit_codes": [first_rc, last_rc]}


# ----------------------------------------------------------------------------------------- latency
class _ScoreTimer:
    """Arrival time of every score message, by (device, ts)."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[str, float], float] = {}
        self.latencies: list[float] = []
        self.received = 0
        self.t_last = 0.0

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        doc = orjson.loads(msg.payload)
        self.received += 1
        self.t_last = now
        self.arrived.setdefault((doc.get("device_id"), doc.get("ts")), now)

    def match(self, messages: Sequence[Message], sent: Sequence[float], warmup: int) -> None:
        for i, ((_, _, device, ts), t) in enumerate(zip(messages, sent, strict=True)):
            got = self.arrived.get((device, ts))
            if i >= warmup and got is not None:
                self.latencies.append(got - t)


def paced_publisher(
    port: int, protocol: str, client_id: str, messages: Sequence[Message], rate: float, out: Connection
) -> None:
    """Runs in a process of its own (a publisher and a subscriber sharing one process's GIL add up to
    ~200 ms to the p99 at 2,500 messages/s, measured with a bare pair): message i is handed to paho at
    t0 + i / rate (late ones go at once: the schedule never drifts). Sends back the hand-over times,
    ``time.perf_counter`` — CLOCK_MONOTONIC, the same clock in every process of the machine.

    After the connect, this one thread drives paho's documented external loop (``loop_read`` /
    ``loop_write`` / ``loop_misc`` around a ``select``): with paho's network thread each publish
    woke that thread, and the pair cost ~85 µs of CPU per message — at 8,000 messages/s the
    publisher took more of the two cores than the service it measured."""
    pub = _client(client_id, protocol, persistent=False)
    pub.max_inflight_messages_set(INFLIGHT)
    pub.max_queued_messages_set(0)
    _connect(pub, port, protocol, expiry_s=0)
    pub.loop_stop()  # connected; from here this thread runs the loop
    sock = pub.socket()
    assert sock is not None
    sent: list[float] = []
    next_misc = t0 = time.perf_counter()

    def serve(timeout: float) -> None:
        nonlocal next_misc
        readable, _, _ = select.select([sock], [sock] if pub.want_write() else [], [], max(0.0, timeout))
        if readable:
            pub.loop_read()
        if pub.want_write():
            pub.loop_write()
        if time.perf_counter() >= next_misc:
            pub.loop_misc()  # keepalive
            next_misc = time.perf_counter() + 1.0

    info = None
    for i, (topic, payload, _, _) in enumerate(messages):
        while (delay := t0 + i / rate - time.perf_counter()) > 0:
            serve(delay)
        sent.append(time.perf_counter())
        info = pub.publish(topic, payload, qos=1)
        serve(0.0)
    t_end = time.perf_counter()
    deadline = t_end + 60
    while info is not None and not info.is_published() and time.perf_counter() < deadline:
        serve(0.05)  # the broker has every message before the client goes
    pub.disconnect()  # without a network thread, written at once
    out.send((sent, t0, t_end))


def with_probes(messages: list[Message], every: int) -> tuple[list[Message], list[int]]:
    """Every ``every``-th message replaced by a probe: the same device and timestamp with a value the
    engine refuses per reading (``bad_value``, or ``wrong_channel_count`` for a multichannel model).
    A probe takes the scored readings' path — the same chunk, micro-batch, log record, durability
    wait and release, in order — and its dead letter is published where their outcomes are issued,
    so its arrival times the batch's outcomes without every score being published."""
    out = list(messages)
    probes = list(range(every - 1, len(out), every))
    for i in probes:
        topic, _, device, ts = out[i]
        out[i] = (topic, orjson.dumps({"ts": ts, "values": ["probe"]}), device, ts)
    return out, probes


def latency_run(
    opts: Options, broker_port: int, rate: float, ns: str, workdir: Path, *, probes: bool = False
) -> dict[str, Any]:
    """Live one-reading messages at ``rate`` for warm-up + ``latency_s`` seconds; the latency of
    every score (``probes`` False: the service publishes every score) or of the probes' dead letters
    (the service as configured, scores not published)."""
    devices = opts.workloads[0].devices
    warmup = int(rate * LATENCY_WARMUP_S)
    n = warmup + max(1, int(rate * opts.latency_s))
    messages = make_messages(Workload("latency", devices, n, 1), ns, seed=1)
    timed = list(range(n))
    if probes:
        messages, timed = with_probes(messages, PROBE_EVERY)
    workdir.mkdir(parents=True)
    env = service_env(opts, broker_port, ns, workdir / "state")
    if not probes:
        env["SENSORWATCH_PUBLISH_SCORES"] = "true"
    svc = ServiceProcess(env, workdir / "service.log")
    timer = _ScoreTimer()
    sub = _client(f"bench-lat-sub-{ns}", opts.protocol, persistent=False)
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    args = (broker_port, PUBLISHER_PROTOCOL, f"bench-lat-pub-{ns}", messages, rate, send)
    pub = ctx.Process(target=paced_publisher, args=args, daemon=True)
    try:
        svc.start()
        svc.wait_ready()
        sub.on_message = timer.on_message
        _connect(sub, broker_port, opts.protocol, receive_maximum=SUBSCRIBER_RECEIVE_MAXIMUM, expiry_s=0)
        _subscribe(sub, f"{ns}-out/deadletter" if probes else f"{ns}-out/scores/+")
        cpu0 = svc.cpu_s()
        pub.start()
        if not recv.poll(LATENCY_WARMUP_S + opts.latency_s + 120):
            raise BenchError("the paced publisher did not finish")
        sent, t0, t_end = recv.recv()
        what = "probe dead letters" if probes else "score messages"
        wait_progress(lambda: timer.received >= len(timed), lambda: timer.received, what)
        cpu_us = 1e6 * (svc.cpu_s() - cpu0) / n  # warm-up included
        skip = sum(1 for i in timed if i < warmup)
        timer.match([messages[i] for i in timed], [sent[i] for i in timed], skip)
    finally:
        with contextlib.suppress(Exception):  # never connected: nothing to close
            _close(sub)
        if pub.is_alive():
            pub.kill()
        svc.stop()
    return {
        **_latency_summary(timer, rate, n, len(timed) - skip, t_end - t0, timer.t_last - t_end),
        "timed": "probes" if probes else "scores",
        "timed_readings": len(timer.latencies),
        "cpu_us_per_reading": cpu_us,
    }


def _latency_summary(
    timer: _ScoreTimer, rate: float, n: int, counted: int, publish_s: float, tail_s: float
) -> dict[str, Any]:
    """Percentiles of the counted readings. ``tail_s`` (last publish → last score) tells a sustained
    rate (about one latency) from an overload (the backlog grew all along)."""
    if not timer.latencies:
        raise BenchError("no score message matched a published reading")
    ms = 1e3 * np.asarray(timer.latencies)
    return {
        "rate": rate,
        "achieved_rate": (n - 1) / publish_s if publish_s > 0 else rate,
        "seconds": n / rate - LATENCY_WARMUP_S,
        "published": counted,
        "matched": len(timer.latencies),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "tail_s": tail_s,
    }


# ------------------------------------------------------------------------------------------ driver
def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _summary(w: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "name": w.name,
        "devices": w.devices,
        "messages": w.messages,
        "readings_per_message": w.batch,
        "readings": w.readings,
        "bare_readings_per_s": med("bare_readings_per_s"),
        "service_readings_per_s": med("service_readings_per_s"),
        "ratio": med("ratio"),
        "service_cpu_us_per_reading": med("service_cpu_us_per_reading"),
        "runs": runs,
    }


def _one_run(opts: Options, port: int, w: Workload, run: int, tmp: Path) -> dict[str, Any]:
    tag = f"b{run}{w.name[0]}{secrets.token_hex(3)}"  # a namespace of its own per workload and run
    bare = bare_drain(port, opts.protocol, w, f"{tag}x")
    svc = service_drain(opts, port, w, f"{tag}s", tmp / f"{tag}s")
    row = {
        "run": run,
        "bare_readings_per_s": bare["readings_per_s"],
        "service_readings_per_s": svc["readings_per_s"],
        "ratio": svc["readings_per_s"] / bare["readings_per_s"],
        "service_cpu_us_per_reading": svc["cpu_us_per_reading"],
        "bare": bare,
        "service": svc,
    }
    _log(
        f"run {run} {w.name}: bare {bare['readings_per_s']:,.0f} r/s, service {svc['readings_per_s']:,.0f} "
        f"r/s ({svc['cpu_us_per_reading']:.0f} µs CPU/reading, window {svc['window_fraction']:.0%})"
    )
    return row


def run(opts: Options) -> dict[str, Any]:
    """The whole bench (see module docstring); the report as a JSON-ready dict."""
    with tempfile.TemporaryDirectory(prefix="sensorwatch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "broker").mkdir()
        with private_broker(tmp / "broker") as port:
            per: dict[str, list[dict[str, Any]]] = {w.name: [] for w in opts.workloads}
            for r in range(1, opts.runs + 1):
                for w in opts.workloads:
                    per[w.name].append(_one_run(opts, port, w, r, tmp))
            workloads = [_summary(w, per[w.name]) for w in opts.workloads]
            # 1. The service as configured, at half its measured one-reading maximum: probes time it.
            rate = workloads[0]["service_readings_per_s"] * opts.latency_fraction
            _log(f"latency: live one-reading messages at {rate:,.0f} r/s, one in {PROBE_EVERY} a probe")
            probe_runs = []
            for r in range(1, opts.runs + 1):
                lat = latency_run(
                    opts, port, rate, f"lp{r}{secrets.token_hex(3)}", tmp / f"latency{r}", probes=True
                )
                _log(f"latency run {r}: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
                probe_runs.append(lat)
            latency = _latency_median(probe_runs)
            # 2. Every score published, which costs the service more than scoring alone: "half the
            # maximum rate" is half of the maximum in that configuration, measured by one more drain.
            scored = _with_scores(opts)
            w0 = opts.workloads[0]
            drain = service_drain(scored, port, w0, f"mx{secrets.token_hex(3)}", tmp / "max-with-scores")
            rate = drain["readings_per_s"] * opts.latency_fraction
            _log(
                f"max with scores published: {drain['readings_per_s']:,.0f} readings/s; latency: live "
                f"one-reading messages at {rate:,.0f} readings/s, every score published"
            )
            with_scores = latency_run(opts, port, rate, f"ls{secrets.token_hex(3)}", tmp / "latency-scores")
            with_scores["max_readings_per_s_with_scores"] = drain["readings_per_s"]
    return {**_machine(opts), "workloads": workloads, "latency": latency, "latency_scores": with_scores}


def _latency_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' medians of every figure (p50, p99, max, rates, CPU), each run kept under ``runs``."""
    out: dict[str, Any] = dict(runs[len(runs) // 2])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["runs"] = runs
    return out


def _with_scores(opts: Options) -> Options:
    return dataclasses.replace(opts, env={**opts.env, "SENSORWATCH_PUBLISH_SCORES": "true"})


def _machine(opts: Options) -> dict[str, Any]:
    return {
        "benchmark": "e2e",
        "protocol": opts.protocol,
        "model": opts.model or "(default)",
        "env": opts.env,
        "runs": opts.runs,
        "python": platform.python_version(),
        "paho_mqtt": metadata.version("paho-mqtt"),
        "mosquitto": mosquitto_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": len(os.sched_getaffinity(0)),
    }


HEADER = (
    f"{'workload':<12} {'devices':>7} {'readings':>9} {'run':>6} {'bare r/s':>11} {'service r/s':>12} "
    f"{'svc/bare':>8} {'CPU µs/r':>9} {'window':>7}"
)


def _fmt_row(w: dict[str, Any], run: str, r: dict[str, Any], fraction: float | None) -> str:
    frac = f"{fraction:>7.0%}" if fraction is not None else f"{'':>7}"
    return (
        f"{w['name']:<12} {w['devices']:>7,} {w['readings']:>9,} {run:>6} {r['bare_readings_per_s']:>11,.0f} "
        f"{r['service_readings_per_s']:>12,.0f} {r['ratio']:>8.3f} {r['service_cpu_us_per_reading']:>9.1f} "
        f"{frac}"
    )


def _latency_line(title: str, lat: dict[str, Any]) -> str:
    return (
        f"{title} at {lat['rate']:,.0f} readings/s (achieved {lat['achieved_rate']:,.0f}) for "
        f"{lat['seconds']:.1f} s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, "
        f"max {lat['max_ms']:.1f} ms, last outcome {lat['tail_s']:.2f} s after the last publish; "
        f"{lat['matched']:,} of {lat['published']:,} timed readings matched; service "
        f"{lat['cpu_us_per_reading']:.0f} µs CPU/reading"
    )


def table(report: dict[str, Any]) -> str:
    lines = [HEADER]
    for w in report["workloads"]:
        for r in w["runs"]:
            lines.append(_fmt_row(w, str(r["run"]), r, r["service"]["window_fraction"]))
        lines.append(_fmt_row(w, "median", w, None))
    lat, lat_s = report["latency"], report["latency_scores"]
    for i, run in enumerate(lat.get("runs", []), start=1):
        lines.append(_latency_line(f"latency run {i} (1 in {PROBE_EVERY} a probe)", run))
    lines.append(_latency_line(f"latency median (1 in {PROBE_EVERY} a probe)", lat))
    lines.append(
        f"service maximum with every score published: {lat_s['max_readings_per_s_with_scores']:,.0f} r/s"
    )
    lines.append(_latency_line("latency (every score published)", lat_s))
    models = {r["service"]["model"] for w in report["workloads"] for r in w["runs"]}
    lines.append(
        f"model {', '.join(sorted(models))}, MQTT {report['protocol']}, mosquitto {report['mosquitto']}, "
        f"paho {report['paho_mqtt']}, {report['cpus']} CPUs, env {report['env'] or '{}'}"
    )
    return "\n".join(lines)


def options(args: argparse.Namespace) -> Options:
    """Options from the ``bench e2e`` arguments; ``--quick`` only changes the defaults."""
    q = args.quick

    def pick(value: Any, normal: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else normal)

    env: dict[str, str] = {}
    for item in args.env or ():
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("SENSORWATCH_"):
            raise ValueError(f"--env {item!r}: expected SENSORWATCH_NAME=VALUE")
        if key in RESERVED_ENV:
            raise ValueError(f"--env {key}: set by the bench itself")
        env[key] = value
    workloads = (
        Workload("one-reading", pick(args.devices, 1000, 100), pick(args.messages, 30_000, 10_000), 1),
        Workload(
            "gateway",
            pick(args.gateway_devices, 200, 20),
            pick(args.gateway_messages, 10_000, 1_000),
            GATEWAY_BATCH,
        ),
    )
    if min(min(w.devices, w.messages) for w in workloads) < 1 or args.runs < 1:
        raise ValueError("--devices, --messages and --runs must be at least 1")
    if not 0 < args.latency_fraction <= 1:
        raise ValueError("--latency-fraction must be in (0, 1]")
    return Options(
        workloads=workloads,
        runs=args.runs,
        protocol=args.protocol or _default_protocol(),
        model=args.model,
        env=env,
        latency_s=pick(args.latency_seconds, 5.0, 2.0),
        latency_fraction=args.latency_fraction,
        json_out=args.json,
    )


def _default_protocol() -> str:
    from service.settings import Settings

    default: str = Settings.model_fields["mqtt_protocol"].default
    return default


def main(args: argparse.Namespace) -> int:
    try:
        opts = options(args)
    except ValueError as exc:
        print(f"sensorwatch bench e2e: {exc}", file=sys.stderr)
        return 2
    try:
        with _sigterm_unwinds():
            report = run(opts)
    except BenchError as exc:
        print(f"sensorwatch bench e2e: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if opts.json_out:  # written before anything else is printed: a closed stdout must not lose it
        Path(opts.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_out).write_text(text + "\n")
    print(table(report))
    return 0


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a CI timeout, a supervisor) unwinds like Ctrl-C: the finally blocks kill the broker and
    the service. Only the main thread may set handlers (an in-process caller may be another thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
