"""Does a 3-node nats-server (JetStream + MQTT 3.1.1) cluster keep every reading its publisher got an
ack for when one node is killed with SIGKILL?  Standalone: stdlib + nats-py + paho-mqtt 2.x, and the
``nats-server`` binary (Debian's 2.9.10 at /usr/sbin/nats-server).  Results: docs/cluster-broker-gap.md.

    python scripts/nats_broker_gap.py --case mqtt-leader --runs 3
    python scripts/nats_broker_gap.py --case probe-mapping
    python scripts/nats_broker_gap.py --list

Each run starts its own private cluster (three ``nats-server`` children on free loopback ports, in a
temporary directory), with the account mapping

    mappings = { "sensors.*.readings": "sw.in.{{partition(12,1)}}.{{wildcard(1)}}" }

on every node.  A publisher sends unique numbered readings (payload = the number) for 24 devices at a
steady rate to ``sensors/<device>/readings`` (MQTT QoS1, paho, ``max_inflight`` 20, the gateway's own
failover over the three MQTT listeners) or ``sensors.<device>.readings`` (nats-py ``js.publish``, ack
awaited, retried on timeout / no responders).  Mid-run one node is killed -9 and later started again
on the same store; once the cluster has settled the readings stream is read back and compared with
what the publisher got acks for.

Designs (where the readings end up):
  direct   stream READINGS, subjects ``sw.in.>``, R3 (the mapped subject is captured directly)
  sourced  stream READINGS, no subjects, ``sources: [{name: "$MQTT_msgs", filter_subject:
           "$MQTT.msgs.sw.in.>"}]``, R3
  msgs     stream ``$MQTT_msgs`` created by us *before* the first MQTT client connects (limits
           retention, R3, subjects ``$MQTT.msgs.>``); the server's MQTT layer then uses it, and the
           readings are read from it with filter ``$MQTT.msgs.sw.in.>``

Only this script's own child processes are ever signalled (by PID); they are killed on exit, also on
Ctrl-C or an exception.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import paho.mqtt.client as mqtt
from nats.js import api

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
MAP_SRC = "sensors.*.readings"
MAP_DST = "sw.in.{{partition(12,1)}}.{{wildcard(1)}}"
READINGS = "READINGS"
MQTT_MSGS = "$MQTT_msgs"
MSGS_FILTER = "$MQTT.msgs.sw.in.>"
DEVICES = [f"d{i:02d}" for i in range(24)]

# --------------------------------------------------------------------------------------------------
# child processes: only ours, only by PID


_CHILDREN: set[subprocess.Popen[bytes]] = set()


def _kill_children() -> None:
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            try:
                proc.kill()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _CHILDREN.discard(proc)


atexit.register(_kill_children)


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Node:
    def __init__(self, name: str, workdir: Path, ports: list[int]) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client_port, self.http_port, self.route_port, self.mqtt_port = ports
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_conf(self, routes: list[int], mqtt_extra: str = "", more_mappings: str = "") -> None:
        r = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
        self.conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.dir}/js" }}\n'
            f"cluster {{ name: gap, listen: 127.0.0.1:{self.route_port}, routes: [{r}] }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} {mqtt_extra} }}\n"
            f'mappings = {{ "{MAP_SRC}": "{MAP_DST}" {more_mappings} }}\n'
        )

    def start(self) -> None:
        assert not self.running
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to us does not reach it; we kill it ourselves
            )
        _CHILDREN.add(self.proc)

    def kill9(self) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
            _CHILDREN.discard(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            _CHILDREN.discard(self.proc)

    def jsz(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=1) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def meta_leader(self) -> str | None:
        doc = self.jsz()
        return ((doc or {}).get("meta_cluster") or {}).get("leader") or None


class Cluster:
    def __init__(self, workdir: Path, mqtt_extra: str = "", more_mappings: str = "") -> None:
        ports = free_ports(12)
        self.nodes = [Node(f"n{i + 1}", workdir, ports[4 * i : 4 * i + 4]) for i in range(3)]
        routes = [n.route_port for n in self.nodes]
        for n in self.nodes:
            n.write_conf(routes, mqtt_extra, more_mappings)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30) -> None:
        for n in self.nodes:
            n.start()
        self.wait_meta_leader(timeout)

    def wait_meta_leader(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.running]
            leaders = {n.meta_leader() for n in live}
            if len(leaders) == 1 and None not in leaders:
                leader = leaders.pop()
                if any(n.name == leader and n.running for n in self.nodes):
                    return str(leader)
            time.sleep(0.1)
        raise RuntimeError(f"no JetStream meta leader within {timeout} s")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


# --------------------------------------------------------------------------------------------------
# helpers


def quiet_nats_cbs() -> dict[str, Any]:
    async def _noop(*_a: Any) -> None:
        return None

    return {"error_cb": _noop, "disconnected_cb": _noop, "reconnected_cb": _noop, "closed_cb": _noop}


async def admin_connect(urls: list[str]) -> nats.NATS:
    return await nats.connect(
        servers=urls,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        name="gap-admin",
        **quiet_nats_cbs(),
    )


async def wait_until(cond: Any, within: float, step: float = 0.05) -> bool:
    """Poll ``cond()`` until it is true or ``within`` seconds have passed; returns the last value."""
    deadline = time.monotonic() + within
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


async def stream_info(js: Any, name: str, tries: int = 1) -> api.StreamInfo | None:
    for i in range(tries):
        try:
            return await js.stream_info(name)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            if i + 1 < tries:
                await asyncio.sleep(0.25)
    return None


async def stream_leader(js: Any, name: str, within: float = 15) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        si = await stream_info(js, name)
        if si is not None and si.cluster is not None and si.cluster.leader:
            return si.cluster.leader
        await asyncio.sleep(0.2)
    raise RuntimeError(f"stream {name} has no leader after {within} s")


async def create_readings(js: Any, design: str) -> None:
    if design == "direct":
        await js.add_stream(name=READINGS, subjects=["sw.in.>"], num_replicas=3, storage=api.StorageType.FILE)
    elif design == "sourced":
        await js.add_stream(
            name=READINGS,
            num_replicas=3,
            storage=api.StorageType.FILE,
            sources=[api.StreamSource(name=MQTT_MSGS, filter_subject=MSGS_FILTER)],
        )
    elif design == "msgs":
        # Created before any MQTT client connects; the MQTT layer looks the stream up and uses it.
        await js.add_stream(
            name=MQTT_MSGS,
            subjects=["$MQTT.msgs.>"],
            num_replicas=3,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
        )
    else:
        raise ValueError(design)


async def read_stream(js: Any, stream: str, filter_subject: str) -> list[tuple[str, bytes]]:
    """Every message of ``stream`` matching the filter: (subject, payload), in stream order."""
    name = f"gapread{os.getpid()}{int(time.monotonic() * 1000) % 100000}"
    cfg = api.ConsumerConfig(
        name=name,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        filter_subject=filter_subject,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    for attempt in range(20):
        try:
            await js.add_consumer(stream, config=cfg)
            break
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    sub = await js.pull_subscribe_bind(name, stream=stream)
    out: list[tuple[str, bytes]] = []
    while True:
        ci = await js.consumer_info(stream, name)
        if ci.num_pending == 0:  # what this consumer has not delivered yet
            break
        try:
            msgs = await sub.fetch(batch=min(1000, max(1, ci.num_pending)), timeout=2)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        out.extend((m.subject, m.data) for m in msgs)
    await sub.unsubscribe()
    with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
        await js.delete_consumer(stream, name)
    return out


async def wait_settled(js: Any, cluster: Cluster, stream: str, within: float) -> dict[str, Any]:
    """All nodes running and agreeing on a meta leader; ``stream`` has a leader, every replica
    current, sources without lag, and its message count unchanged for 2 s."""
    t0 = time.monotonic()
    deadline = t0 + within
    last: tuple[int, int] | None = None
    stable_since = None
    note = "timeout"
    while time.monotonic() < deadline:
        try:
            cluster.wait_meta_leader(timeout=max(0.5, deadline - time.monotonic()))
        except RuntimeError:
            break
        si = await stream_info(js, stream)
        ok = si is not None and si.cluster is not None and bool(si.cluster.leader)
        if ok and si.cluster.replicas:
            ok = all(p.current and not p.offline for p in si.cluster.replicas)
        if ok and si.cluster.replicas is not None and len(si.cluster.replicas) < 2:
            ok = False
        if ok and si.sources:
            ok = all((s.lag or 0) == 0 for s in si.sources)
        if ok:
            cur = (si.state.messages, si.state.last_seq)
            if cur != last:
                last, stable_since = cur, time.monotonic()
            elif time.monotonic() - stable_since >= 2.0:
                note = "settled"
                break
        await asyncio.sleep(0.5)
    return {"settle_s": round(time.monotonic() - t0, 1), "settle": note}


# --------------------------------------------------------------------------------------------------
# publishers


class MqttPublisher:
    """A paho gateway publishing QoS1 readings for all devices, failing over to the next listener in
    its list on a disconnect or a failed connect (paho re-sends every message without PUBACK)."""

    def __init__(self, ports: list[int], client_id: str, inflight: int) -> None:
        self.ports = ports
        self.idx = 0
        self.mid_to_id: dict[int, int] = {}
        self.acks: list[tuple[int, float]] = []  # (mid, monotonic time)
        self.events: list[tuple[float, str]] = []
        self.t_start = self.last_kick = self.t_connected = time.monotonic()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        c.max_inflight_messages_set(inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, 2)
        c.on_publish = self._on_publish
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        self.c = c

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        self.acks.append((mid, time.monotonic()))

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.t_connected = time.monotonic()
        self.events.append((time.monotonic(), f"connected :{self.ports[self.idx]} rc={rc}"))

    def _rotate(self) -> None:
        self.idx = (self.idx + 1) % len(self.ports)
        try:
            self.c.port = self.ports[self.idx]
        except RuntimeError:
            self.c._port = self.ports[self.idx]

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.events.append((time.monotonic(), f"disconnected :{self.ports[self.idx]} rc={rc}"))
        self._rotate()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        self.events.append((time.monotonic(), f"connect failed :{self.ports[self.idx]}"))
        self._rotate()

    def start(self, timeout: float = 15) -> float:
        """Connect; returns the seconds until CONNACK (the first MQTT CONNECT on a node creates that
        node's MQTT account session manager: several JetStream API round trips)."""
        t = time.monotonic()
        self.c.connect("127.0.0.1", self.ports[0], keepalive=10)
        self.c.loop_start()
        deadline = t + timeout
        while not self.c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        return round(time.monotonic() - t, 3)

    def publish(self, i: int, device: str) -> None:
        info = self.c.publish(f"sensors/{device}/readings", str(i).encode(), qos=1)
        self.mid_to_id[info.mid] = i

    def acked_ids(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for mid, t in list(self.acks):
            i = self.mid_to_id.get(mid)
            if i is not None and i not in out:
                out[i] = t
        return out

    def pending(self) -> int:
        return len(self.mid_to_id) - len(self.acked_ids())

    def watchdog(self, stall_s: float) -> None:
        """What a device would do: with readings waiting for a PUBACK and none for ``stall_s``
        (counted from the last PUBACK or the last CONNACK, whichever is later), drop the connection;
        paho then reconnects to the next listener and re-sends every message without a PUBACK.
        (While ``$MQTT_msgs`` has no leader the server holds each QoS1 PUBLISH for up to 4 s and then
        closes the connection itself; this only shortens a stall, it never turns one into a loss.)"""
        now = time.monotonic()
        last_ack = self.acks[-1][1] if self.acks else self.t_start
        last_ok = max(last_ack, self.t_connected)
        if (
            stall_s > 0
            and self.c.is_connected()
            and self.pending() > 0
            and now - last_ok > stall_s
            and now - self.last_kick > stall_s
        ):
            self.last_kick = now
            self.events.append(
                (now, f"watchdog: no PUBACK for {now - last_ack:.1f} s, dropping :{self.ports[self.idx]}")
            )
            sock = self.c.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def out_states(self) -> dict[str, int]:
        with self.c._out_message_mutex:
            states = collections.Counter(m.state for m in self.c._out_messages.values())
        return {getattr(k, "name", str(k)): v for k, v in states.items()}

    def stop(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


class MqttSubscriber:
    """A long-lived MQTT session (clean_session=False, QoS1) standing in for the service."""

    def __init__(self, ports: list[int], topic: str, client_id: str = "svc-sub") -> None:
        self.ports, self.idx, self.topic = ports, 0, topic
        self.got: collections.Counter[int] = collections.Counter()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        c.reconnect_delay_set(1, 2)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(self.topic, qos=1)
        c.on_message = self._on_message
        c.on_disconnect = lambda *a: self._rotate()
        c.on_connect_fail = lambda *a: self._rotate()
        self.c = c

    def _rotate(self) -> None:
        self.idx = (self.idx + 1) % len(self.ports)
        try:
            self.c.port = self.ports[self.idx]
        except RuntimeError:
            self.c._port = self.ports[self.idx]

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError):
            self.got[int(msg.payload)] += 1

    def start(self) -> None:
        self.c.connect("127.0.0.1", self.ports[0], keepalive=10)
        self.c.loop_start()
        deadline = time.monotonic() + 5
        while not self.c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # SUBACK

    def stop(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


async def js_publisher(
    urls: list[str],
    n: int,
    rate: float,
    t0: float,
    acked: dict[int, float],
    stats: dict[str, int],
    stop: asyncio.Event,
    msg_id: bool,
) -> None:
    nc = await nats.connect(
        servers=urls,
        dont_randomize=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=1,
        name="gap-jspub",
        **quiet_nats_cbs(),
    )
    js = nc.jetstream(timeout=1.0)
    try:
        for i in range(n):
            if stop.is_set():
                break
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            hdrs = {"Nats-Msg-Id": f"r{i}"} if msg_id else None
            while not stop.is_set():
                stats["attempts"] += 1
                try:
                    await js.publish(
                        f"sensors.{DEVICES[i % len(DEVICES)]}.readings",
                        str(i).encode(),
                        timeout=1.0,
                        headers=hdrs,
                    )
                    acked[i] = time.monotonic()
                    stats["published"] = i + 1
                    break
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
                    key = f"err_{type(e).__name__}"
                    stats[key] = stats.get(key, 0) + 1
                    await asyncio.sleep(0.05)
    finally:
        await nc.close()


# --------------------------------------------------------------------------------------------------
# gap cases


@dataclass(frozen=True)
class Case:
    publisher: str  # mqtt | js
    design: str  # direct | sourced | msgs
    victim: str  # leader | own-node | msgs-leader | sub-node
    sub_topic: str | None = None  # long-lived MQTT QoS1 session subscription
    help: str = ""


CASES: dict[str, Case] = {
    "mqtt-leader": Case(
        "mqtt", "direct", "leader", help="MQTT → READINGS(sw.in.>); kill READINGS leader (≠ A)"
    ),
    "mqtt-own-node": Case(
        "mqtt", "direct", "own-node", help="MQTT → READINGS(sw.in.>); kill the publisher's node A"
    ),
    "js-leader": Case("js", "direct", "leader", help="js.publish → READINGS; kill READINGS leader (≠ A)"),
    "js-own-node": Case("js", "direct", "own-node", help="js.publish → READINGS; kill A"),
    "mqtt-sourced-leader": Case(
        "mqtt", "sourced", "leader", help="READINGS sources $MQTT_msgs; kill READINGS leader"
    ),
    "mqtt-sourced-msgs-leader": Case(
        "mqtt", "sourced", "msgs-leader", help="READINGS sources $MQTT_msgs; kill $MQTT_msgs leader"
    ),
    "mqtt-sourced-own-node": Case("mqtt", "sourced", "own-node", help="READINGS sources $MQTT_msgs; kill A"),
    "mqtt-sourced-sub-leader": Case(
        "mqtt", "sourced", "leader", "sw/in/#", help="as mqtt-sourced-leader + MQTT session sub sw/in/#"
    ),
    "mqtt-sourced-sub-own-node": Case(
        "mqtt", "sourced", "own-node", "sw/in/#", help="as mqtt-sourced-own-node + MQTT session sub"
    ),
    "mqtt-sub-own-node": Case(
        "mqtt",
        "direct",
        "own-node",
        "sw/in/#",
        help="direct READINGS + MQTT session sub sw/in/# (the sub is measured too)",
    ),
    "mqtt-sub-msgs-leader": Case(
        "mqtt",
        "direct",
        "msgs-leader",
        "sw/in/#",
        help="direct READINGS + MQTT session sub; kill $MQTT_msgs leader",
    ),
    "mqtt-sub-sub-node": Case(
        "mqtt",
        "direct",
        "sub-node",
        "sw/in/#",
        help="direct READINGS + MQTT session sub; kill the subscriber's node",
    ),
    "mqtt-msgs-leader": Case(
        "mqtt", "msgs", "leader", help="our own R3 limits $MQTT_msgs; kill its leader (≠ A)"
    ),
    "mqtt-msgs-own-node": Case("mqtt", "msgs", "own-node", help="our own R3 limits $MQTT_msgs; kill A"),
}


@dataclass
class RunResult:
    case: str
    run: int
    published: int = 0
    acked: int = 0
    missing_after_ack: int = 0
    missing_unacked: int = 0
    stored: int = 0
    duplicates: int = 0
    longest_ack_gap_s: float = 0.0
    kill_to_next_ack_s: float | None = None
    node_a: str = ""
    victim: str = ""
    roles: dict[str, Any] = field(default_factory=dict)
    sub_received: int | None = None
    sub_missing_after_ack: int | None = None
    sub_duplicates: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    missing_sample: list[int] = field(default_factory=list)


async def run_gap(name: str, case: Case, run: int, args: argparse.Namespace, workdir: Path) -> RunResult:
    res = RunResult(case=name, run=run)
    cluster = Cluster(workdir, mqtt_extra=args.mqtt_extra)
    pub: MqttPublisher | None = None
    sub: MqttSubscriber | None = None
    nc = None
    try:
        cluster.start()
        nc = await admin_connect(cluster.urls)
        js = nc.jetstream(timeout=5)
        if case.design in ("direct", "msgs"):
            await create_readings(js, case.design)
        read_from, read_filter = (MQTT_MSGS, MSGS_FILTER) if case.design == "msgs" else (READINGS, "sw.in.>")
        if case.design == "sourced":
            read_filter = MSGS_FILTER

        # The MQTT layer creates $MQTT_msgs (and each node its MQTT account session manager: several
        # JetStream API round trips) on the first MQTT CONNECT; do that on every node first.
        uses_mqtt = case.publisher == "mqtt" or case.sub_topic is not None
        if uses_mqtt:
            res.extra["warmup_connect_s"] = {}
            for node in cluster.nodes:
                w = MqttPublisher([node.mqtt_port], f"warmup-{node.name}", 1)
                res.extra["warmup_connect_s"][node.name] = w.start()
                w.stop()
            await stream_leader(js, MQTT_MSGS)
        if case.design == "sourced":
            await create_readings(js, "sourced")
        r_lead = await stream_leader(js, READINGS) if case.design != "msgs" else None
        m_lead = await stream_leader(js, MQTT_MSGS) if uses_mqtt else None
        # keep the two leaders apart, so that killing one leaves the other up
        for _ in range(10):
            if r_lead is None or m_lead is None or r_lead != m_lead:
                break
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{READINGS}", b"", timeout=5)
            await asyncio.sleep(1.0)
            r_lead = await stream_leader(js, READINGS)
        res.roles["leaders_before"] = {READINGS: r_lead, MQTT_MSGS: m_lead}

        names = [n.name for n in cluster.nodes]
        if case.victim == "leader":
            victim = r_lead if case.design != "msgs" else m_lead
        elif case.victim == "msgs-leader":
            victim = m_lead
        else:
            victim = None
        sub_first = None
        if (
            case.victim == "sub-node"
        ):  # the subscriber's node in turn: $MQTT_msgs leader, READINGS leader, third
            ring = list(dict.fromkeys([x for x in (m_lead, r_lead) if x] + names))
            victim = sub_first = ring[(run - 1) % len(ring)]
            a = next(x for x in names if x != victim)
        elif victim is not None:  # A: the other two nodes in turn
            others = [x for x in names if x != victim]
            a = others[(run - 1) % 2]
        else:  # own node: A in turn the READINGS leader, the $MQTT_msgs leader, the third node
            ring = [x for x in (r_lead, m_lead) if x] + names
            ring = list(dict.fromkeys(ring))
            a = ring[(run - 1) % len(ring)]
            victim = a
        res.roles["A_is"] = [
            k for k, v in ((READINGS + " leader", r_lead), (MQTT_MSGS + " leader", m_lead)) if v == a
        ] or ["no leader"]
        res.node_a, res.victim = a, victim
        order = [a] + [x for x in names if x != a]
        node_of = {n.name: n for n in cluster.nodes}

        if case.sub_topic:
            sub_order = [x for x in names if x not in (a, victim)] + [a if a != victim else victim]
            sub_order = list(dict.fromkeys(([sub_first] if sub_first else []) + sub_order + names))
            sub = MqttSubscriber([node_of[x].mqtt_port for x in sub_order], case.sub_topic)
            sub.start()
            res.roles["sub_node"] = sub_order[0]

        n_total = int(args.rate * args.seconds)
        acked_js: dict[int, float] = {}
        stats: dict[str, int] = {"attempts": 0, "published": 0}
        stop = asyncio.Event()
        t0 = time.monotonic() + 0.2
        pub_task = None
        pub_thread = None
        if case.publisher == "mqtt":
            pub = MqttPublisher([node_of[x].mqtt_port for x in order], f"gw-{run}", args.inflight)
            pub.start()

            def pump() -> None:
                for i in range(n_total):
                    if stop.is_set():
                        return
                    d = t0 + i / args.rate - time.monotonic()
                    if d > 0:
                        time.sleep(d)
                    pub.publish(i, DEVICES[i % len(DEVICES)])

            pub_thread = threading.Thread(target=pump, daemon=True)
            pub_thread.start()
        else:
            pub_task = asyncio.create_task(
                js_publisher(
                    [node_of[x].url for x in order],
                    n_total,
                    args.rate,
                    t0,
                    acked_js,
                    stats,
                    stop,
                    args.js_msg_id,
                )
            )

        async def dog() -> None:
            while pub is not None:
                pub.watchdog(args.watchdog)
                await asyncio.sleep(0.5)

        dog_task = asyncio.create_task(dog())
        await asyncio.sleep(max(0.0, t0 + args.kill_at - time.monotonic()))
        t_kill = time.monotonic()
        node_of[victim].kill9()
        await asyncio.sleep(max(0.0, t0 + args.restart_at - time.monotonic()))
        node_of[victim].start()
        # let the publisher finish and every message be acked (or give up)
        deadline = t0 + args.seconds + args.drain
        while time.monotonic() < deadline:
            if case.publisher == "mqtt":
                assert pub_thread is not None
                assert pub is not None
                if not pub_thread.is_alive() and pub.pending() == 0:
                    break
            elif pub_task is not None and pub_task.done():
                break
            await asyncio.sleep(0.2)
        stop.set()
        dog_task.cancel()
        if pub_task is not None:
            try:
                await asyncio.wait_for(pub_task, 5)
            except TimeoutError:
                pub_task.cancel()
        if pub_thread is not None:
            pub_thread.join(5)

        if case.publisher == "mqtt":
            assert pub is not None
            acked = pub.acked_ids()
            res.published = len(set(pub.mid_to_id.values()))
            res.extra["events"] = [f"{t - t0:.2f}s {e}" for t, e in pub.events]
            res.extra["paho_unacked_states"] = pub.out_states()
        else:
            acked = dict(acked_js)
            res.published = stats["published"] + (0 if stats["published"] == n_total else 1)
            res.extra["js_stats"] = stats
        res.acked = len(acked)
        times = sorted(acked.values())
        gaps = [b - a_ for a_, b in zip([t0, *times], times, strict=False)]
        res.longest_ack_gap_s = round(max(gaps) if gaps else 0.0, 2)
        after = [t for t in times if t > t_kill]
        res.kill_to_next_ack_s = round(after[0] - t_kill, 2) if after else None

        res.extra.update(await wait_settled(js, cluster, read_from, args.settle))
        if case.design == "sourced":
            res.extra["mqtt_msgs_state"] = _state(await stream_info(js, MQTT_MSGS, 5))
        if case.design == "direct" and (case.publisher == "mqtt" or case.sub_topic):
            res.extra["mqtt_msgs_state"] = _state(await stream_info(js, MQTT_MSGS, 5))
        leaders_after = {READINGS: None, MQTT_MSGS: None}
        for s in leaders_after:
            si = await stream_info(js, s, 3)
            if si is not None and si.cluster is not None:
                leaders_after[s] = si.cluster.leader
        res.roles["leaders_after"] = leaders_after

        rows = await read_stream(js, read_from, read_filter)
        ids = collections.Counter(int(data) for _subj, data in rows if data.isdigit())
        res.stored = sum(ids.values())
        res.duplicates = res.stored - len(ids)
        missing = sorted(i for i in acked if i not in ids)
        res.missing_after_ack = len(missing)
        res.missing_sample = missing[:10]
        res.extra["missing_ranges"] = _ranges(missing)
        published_ids = set(range(res.published))
        res.missing_unacked = len([i for i in published_ids if i not in acked and i not in ids])
        if sub is not None:
            # a QoS1 message pushed to the session while its node died is redelivered by the
            # session's JetStream consumer only after its AckWait (MQTT default 30 s)
            t_sub = time.monotonic()
            got = sub.got
            await wait_until(lambda: all(i in got for i in acked), args.sub_wait, 0.5)
            res.extra["sub_wait_s"] = round(time.monotonic() - t_sub, 1)
            res.sub_received = len(sub.got)
            res.sub_missing_after_ack = len([i for i in acked if i not in sub.got])
            res.sub_duplicates = sum(sub.got.values()) - len(sub.got)
        return res
    finally:
        for c in (pub, sub):
            if c is not None:
                with contextlib.suppress(Exception):  # cleanup must not hide the real error
                    c.stop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
        cluster.stop()


def _ranges(ids: list[int]) -> list[str]:
    """[3, 4, 5, 9] -> ["3-5", "9"] (at most 12 ranges listed)."""
    out: list[str] = []
    start = prev = None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return out[:12] + ([f"... {len(out) - 12} more"] if len(out) > 12 else [])


def _enum(v: Any) -> Any:
    """nats-py 2.15 leaves enum fields of server responses as plain strings."""
    return getattr(v, "value", v)


def _state(si: api.StreamInfo | None) -> dict[str, Any] | None:
    if si is None:
        return None
    return {
        "messages": si.state.messages,
        "last_seq": si.state.last_seq,
        "consumers": si.state.consumer_count,
        "replicas": 1 + len(si.cluster.replicas or []) if si.cluster else 1,
        "retention": _enum(si.config.retention),
    }


# --------------------------------------------------------------------------------------------------
# probes (questions 1 and 3)


def mqtt_pub_once(port: int, topic: str, payload: bytes, client_id: str, timeout: float = 3) -> str:
    """Publish one QoS1 message on a fresh connection; 'puback', 'no-puback' or 'connect-failed'."""
    done = threading.Event()
    dropped = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.on_publish = lambda *a: done.set()
    c.on_disconnect = lambda *a: dropped.set()
    try:
        c.connect("127.0.0.1", port)
    except OSError:
        return "connect-failed"
    c.loop_start()
    t_end = time.monotonic() + timeout
    while not c.is_connected() and time.monotonic() < t_end:
        time.sleep(0.02)
    c.publish(topic, payload, qos=1)
    done.wait(timeout)
    out = "puback" if done.is_set() else ("connection-closed-by-server" if dropped.is_set() else "no-puback")
    c.disconnect()
    c.loop_stop()
    return out


async def probe_mapping(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster = Cluster(workdir, mqtt_extra=args.mqtt_extra)
    out: dict[str, Any] = {}
    try:
        cluster.start()
        nc = await admin_connect(cluster.urls)
        js = nc.jetstream(timeout=5)
        await create_readings(js, "direct")
        await stream_leader(js, READINGS)
        devices = [f"dev{i:03d}" for i in range(240)]
        # MQTT: each device published once through each node's MQTT listener (one gateway per node)
        acks: dict[str, int] = {}
        connect_s: dict[str, float] = {}
        for node in cluster.nodes:
            pub = MqttPublisher([node.mqtt_port], f"map-{node.name}", 20)
            connect_s[node.name] = pub.start()
            for k, d in enumerate(devices):
                info = pub.c.publish(f"sensors/{d}/readings", f"mqtt|{node.name}|{d}".encode(), qos=1)
                pub.mid_to_id[info.mid] = k
            await wait_until(lambda p=pub: p.pending() == 0, 30, 0.05)
            acks[node.name] = len(pub.acked_ids())
            pub.stop()
        out["mqtt_pubacks_per_node"] = acks
        out["first_mqtt_connect_s_per_node"] = connect_s
        # JetStream API: js.publish through each node
        js_acks: dict[str, Any] = {}
        for node in cluster.nodes:
            pnc = await nats.connect(servers=[node.url], **quiet_nats_cbs())
            pjs = pnc.jetstream(timeout=3)
            ok, errs, stream_names = 0, collections.Counter(), collections.Counter()
            for d in devices:
                try:
                    ack = await pjs.publish(f"sensors.{d}.readings", f"js|{node.name}|{d}".encode())
                    ok += 1
                    stream_names[ack.stream] += 1
                except Exception as e:
                    errs[type(e).__name__] += 1
            js_acks[node.name] = {"acked": ok, "errors": dict(errs), "ack_stream": dict(stream_names)}
            await pnc.close()
        out["js_acks_per_node"] = js_acks
        await asyncio.sleep(1)
        rows = await read_stream(js, READINGS, "sw.in.>")
        out["stored"] = len(rows)
        part_of: dict[str, set[int]] = collections.defaultdict(set)
        per_part: collections.Counter[int] = collections.Counter()
        subj_ok = 0
        headers_seen = set()
        for subj, data in rows:
            kind, _node, dev = data.decode().split("|")
            tok = subj.split(".")
            if len(tok) == 4 and tok[:2] == ["sw", "in"] and tok[3] == dev:
                subj_ok += 1
            part_of[dev].add(int(tok[2]))
            if kind == "mqtt":
                per_part[int(tok[2])] += 1
            headers_seen.add(kind)
        out["subject_form_ok"] = f"{subj_ok}/{len(rows)} stored as sw.in.<p>.<device>"
        out["devices_with_one_partition"] = sum(1 for d in devices if len(part_of[d]) == 1)
        out["devices_total"] = len(devices)
        out["devices_per_partition"] = {p: sum(1 for d in devices if part_of[d] == {p}) for p in range(12)}
        out["partition_range"] = [min(per_part), max(per_part)] if per_part else None
        # stability across cluster restarts: stop all, start all, publish the same devices again
        first = {d: min(ps) for d, ps in part_of.items() if ps}
        cluster.stop()
        await nc.close()
        for n in cluster.nodes:
            n.start()
        cluster.wait_meta_leader()
        nc = await admin_connect(cluster.urls)
        js = nc.jetstream(timeout=5)
        await stream_leader(js, READINGS)
        before = (await stream_info(js, READINGS, 10)).state.last_seq
        pub = MqttPublisher([cluster.nodes[1].mqtt_port], "map-again", 20)
        pub.start()
        for k, d in enumerate(devices):
            info = pub.c.publish(f"sensors/{d}/readings", f"mqtt|again|{d}".encode(), qos=1)
            pub.mid_to_id[info.mid] = k
        await wait_until(lambda: pub.pending() == 0, 10, 0.05)
        pub.stop()
        await asyncio.sleep(1)
        rows2 = [r for r in await read_stream(js, READINGS, "sw.in.>") if r[1].startswith(b"mqtt|again|")]
        same = sum(
            1 for subj, data in rows2 if first.get(data.decode().split("|")[2]) == int(subj.split(".")[2])
        )
        out["after_full_restart_same_partition"] = f"{same}/{len(rows2)} (stream last_seq before: {before})"

        # odd device ids
        odd = ["dev-1", "dev_1", "dev:1", "dév1", "DEV1", "dev.1", "dev 1", "a*b", "*", ">", "dev$1", ""]
        odd_out: dict[str, Any] = {}
        for d in odd:
            topic = f"sensors/{d}/readings"
            r_mqtt = mqtt_pub_once(cluster.nodes[0].mqtt_port, topic, f"odd|mqtt|{d}".encode(), "odd")
            pnc = await nats.connect(servers=[cluster.nodes[0].url], **quiet_nats_cbs())
            pjs = pnc.jetstream(timeout=2)
            try:
                ack = await pjs.publish(f"sensors.{d}.readings", f"odd|js|{d}".encode())
                r_js = f"ack stream={ack.stream} seq={ack.seq}"
            except Exception as e:
                r_js = f"{type(e).__name__}: {e}"
            await pnc.close()
            odd_out[d] = {"mqtt": r_mqtt, "js": r_js}
        await asyncio.sleep(1)
        rows3 = [r for r in await read_stream(js, READINGS, "sw.in.>") if r[1].startswith(b"odd|")]
        for subj, data in rows3:
            _o, kind, d = data.decode().split("|", 2)
            odd_out[d].setdefault("stored_as", []).append(f"{kind}:{subj}")
        # where did the unmapped ones go? a plain NATS subscriber on > would only see live traffic,
        # so ask the server which subjects exist in any stream
        out["odd_device_ids"] = odd_out
        await nc.close()
        return out
    finally:
        cluster.stop()


async def probe_mqtt_msgs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """When does the MQTT layer store a QoS1 PUBLISH in $MQTT_msgs, under which subject, and what
    do a sourcing stream and a long-lived MQTT session subscription change?"""
    cluster = Cluster(workdir, mqtt_extra=args.mqtt_extra)
    out: dict[str, Any] = {}
    try:
        cluster.start()
        nc = await admin_connect(cluster.urls)
        js = nc.jetstream(timeout=5)
        port = cluster.nodes[0].mqtt_port
        pub = MqttPublisher([port], "probe-pub", 20)
        pub.start()
        await stream_leader(js, MQTT_MSGS)
        si = await stream_info(js, MQTT_MSGS, 5)
        out["mqtt_msgs_config"] = {
            "subjects": si.config.subjects,
            "retention": _enum(si.config.retention),
            "replicas": si.config.num_replicas,
            "storage": _enum(si.config.storage),
        }
        streams = await js.streams_info()
        out["streams_after_first_connect"] = sorted(s.config.name for s in streams)
        counter = [0]

        async def burst(label: str, n: int = 50) -> None:
            base = counter[0]
            t = time.monotonic()
            for k in range(n):
                info = pub.c.publish(f"sensors/{DEVICES[k % 24]}/readings", str(base + k).encode(), qos=1)
                pub.mid_to_id[info.mid] = base + k
            await wait_until(lambda: pub.pending() == 0, 10, 0.02)
            dt = time.monotonic() - t
            counter[0] += n
            await asyncio.sleep(0.5)
            s = await stream_info(js, MQTT_MSGS, 5)
            out[label] = {
                "pubacked": len(pub.acked_ids()),
                "burst_s": round(dt, 3),
                "mqtt_msgs": {
                    "messages": s.state.messages,
                    "last_seq": s.state.last_seq,
                    "consumers": s.state.consumer_count,
                },
            }

        await burst("1_no_subscription")
        # a QoS1 subscription on the *unmapped* topic
        s1 = MqttSubscriber([port], "sensors/+/readings", "probe-sub-unmapped")
        s1.start()
        await burst("2_qos1_sub_on_sensors_plus_readings")
        out["2_qos1_sub_on_sensors_plus_readings"]["sub_received"] = len(s1.got)
        s1.stop()
        # a QoS1 subscription on the mapped subject, persistent session, then disconnected
        s2 = MqttSubscriber([port], "sw/in/#", "probe-sub-mapped")
        s2.start()
        await burst("3_qos1_sub_on_sw_in_hash")
        out["3_qos1_sub_on_sw_in_hash"]["sub_received"] = len(s2.got)
        s2.c.loop_stop()
        s2.c.disconnect()  # paho's loop is stopped: the DISCONNECT may not go out; session stays
        s2.c._sock_close()
        await asyncio.sleep(1)
        await burst("4_session_sub_offline")
        try:
            last = await js.get_msg(MQTT_MSGS, (await stream_info(js, MQTT_MSGS)).state.last_seq)
            out["4_session_sub_offline"]["stored_subject_example"] = last.subject
            out["4_session_sub_offline"]["stored_headers_example"] = last.headers
        except Exception as e:
            out["4_session_sub_offline"]["stored_subject_example"] = f"{type(e).__name__}: {e}"
        # reconnect the session: are the offline messages delivered?
        s2b = MqttSubscriber([port], "sw/in/#", "probe-sub-mapped")
        s2b.start()
        await asyncio.sleep(2)
        out["4_session_sub_offline"]["delivered_on_session_resume"] = len(s2b.got)
        # remove the session subscription (unsubscribe + clean disconnect)
        s2b.c.unsubscribe("sw/in/#")
        await asyncio.sleep(0.5)
        s2b.stop()
        clean = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="probe-sub-mapped",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        clean.connect("127.0.0.1", port)
        clean.loop_start()
        await asyncio.sleep(1)
        clean.disconnect()
        clean.loop_stop()
        await asyncio.sleep(0.5)
        await burst("5_no_subscription_again")
        # a stream sourcing from $MQTT_msgs, no MQTT subscription
        await create_readings(js, "sourced")
        await stream_leader(js, READINGS)
        await asyncio.sleep(1)
        await burst("6_sourced_stream_no_sub")
        await asyncio.sleep(1)
        r = await stream_info(js, READINGS, 5)
        out["6_sourced_stream_no_sub"]["readings"] = {"messages": r.state.messages}
        try:
            cons = await js.consumers_info(MQTT_MSGS)
            out["6_sourced_stream_no_sub"]["mqtt_msgs_consumers_listed"] = [
                {"name": c.name, "filter": c.config.filter_subject, "ack": _enum(c.config.ack_policy)}
                for c in cons
            ]
        except Exception as e:
            out["6_sourced_stream_no_sub"]["mqtt_msgs_consumers_listed"] = f"{type(e).__name__}: {e}"
        rows = await read_stream(js, READINGS, MSGS_FILTER)
        out["6_sourced_stream_no_sub"]["readings_subject_example"] = rows[-1][0] if rows else None
        out["6_sourced_stream_no_sub"]["readings_ids"] = (
            f"{min(int(d) for _s, d in rows)}..{max(int(d) for _s, d in rows)}" if rows else None
        )
        pub.stop()
        await nc.close()
        return out
    finally:
        cluster.stop()


JS_MAP = '"jsin.*.readings": "$MQTT.msgs.sw.in.{{partition(12,1)}}.{{wildcard(1)}}"'


async def probe_unified(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Our own limits-retention $MQTT_msgs as the one readings stream for MQTT devices and, through
    a second mapping into the $MQTT.msgs. namespace, for JetStream-API publishers."""
    cluster = Cluster(workdir, mqtt_extra=args.mqtt_extra, more_mappings=", " + JS_MAP)
    out: dict[str, Any] = {"extra_mapping": JS_MAP}
    try:
        cluster.start()
        nc = await admin_connect(cluster.urls)
        js = nc.jetstream(timeout=5)
        await create_readings(js, "msgs")
        await stream_leader(js, MQTT_MSGS)
        devices = [f"dev{i:03d}" for i in range(240)]
        pub = MqttPublisher([cluster.nodes[0].mqtt_port], "uni-mqtt", 20)
        out["first_connect_s"] = pub.start()
        si = await stream_info(js, MQTT_MSGS, 5)
        out["mqtt_msgs_after_connect"] = {
            "retention": _enum(si.config.retention),
            "subjects": si.config.subjects,
            "replicas": si.config.num_replicas,
        }
        for k, d in enumerate(devices):
            info = pub.c.publish(f"sensors/{d}/readings", f"mqtt|{d}".encode(), qos=1)
            pub.mid_to_id[info.mid] = k
        await wait_until(lambda: pub.pending() == 0, 30, 0.05)
        out["mqtt_pubacked"] = len(pub.acked_ids())
        pub.stop()
        acks: collections.Counter[str] = collections.Counter()
        for d in devices:
            try:
                ack = await js.publish(f"jsin.{d}.readings", f"js|{d}".encode())
                acks[ack.stream] += 1
            except Exception as e:
                acks[type(e).__name__] += 1
        out["js_acks_by_stream"] = dict(acks)
        await asyncio.sleep(1)
        rows = await read_stream(js, MQTT_MSGS, MSGS_FILTER)
        per: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for subj, data in rows:
            kind, d = data.decode().split("|")
            per[d][kind].append(subj.split(".")[4])
        out["stored"] = len(rows)
        out["devices_once_per_path_same_partition"] = sum(
            1 for d in devices if len(per[d]["mqtt"]) == 1 and per[d]["mqtt"] == per[d]["js"]
        )
        out["subject_example"] = rows[0][0] if rows else None
        si = await stream_info(js, MQTT_MSGS, 5)
        out["mqtt_msgs_state"] = _state(si)
        await nc.close()
        return out
    finally:
        cluster.stop()


# --------------------------------------------------------------------------------------------------


def print_table(results: list[RunResult]) -> None:
    cols = [
        ("case", 26),
        ("run", 3),
        ("A", 3),
        ("kill", 4),
        ("published", 9),
        ("acked", 6),
        ("miss_ack", 8),
        ("miss_unack", 10),
        ("dups", 5),
        ("gap_s", 6),
        ("kill→ack", 8),
        ("sub_miss", 8),
    ]
    print(" ".join(f"{c:>{w}}" for c, w in cols))
    for r in results:
        vals = [
            r.case,
            r.run,
            r.node_a,
            r.victim,
            r.published,
            r.acked,
            r.missing_after_ack,
            r.missing_unacked,
            r.duplicates,
            r.longest_ack_gap_s,
            "-" if r.kill_to_next_ack_s is None else r.kill_to_next_ack_s,
            "-" if r.sub_missing_after_ack is None else r.sub_missing_after_ack,
        ]
        print(" ".join(f"{v!s:>{w}}" for v, (_c, w) in zip(vals, cols, strict=True)))


async def amain(args: argparse.Namespace) -> int:
    base = Path(args.workdir) if args.workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nats_broker_gap_", dir=base))
    try:
        if args.case == "probe-mapping":
            print(json.dumps(await probe_mapping(args, tmp / "probe"), indent=2, default=str))
            return 0
        if args.case == "probe-unified":
            print(json.dumps(await probe_unified(args, tmp / "probe"), indent=2, default=str))
            return 0
        if args.case == "probe-mqtt-msgs":
            print(json.dumps(await probe_mqtt_msgs(args, tmp / "probe"), indent=2, default=str))
            return 0
        case = CASES[args.case]
        results = []
        for run in range(1, args.runs + 1):
            t = time.monotonic()
            r = await run_gap(args.case, case, run, args, tmp / f"run{run}")
            r.extra["run_s"] = round(time.monotonic() - t, 1)
            results.append(r)
            print(json.dumps(asdict(r), default=str), flush=True)
        print()
        print_table(results)
        return 0
    finally:
        _kill_children()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=[*sorted(CASES), "probe-mapping", "probe-mqtt-msgs", "probe-unified"])
    ap.add_argument("--list", action="store_true", help="describe the cases")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=100.0, help="readings per second")
    ap.add_argument("--seconds", type=float, default=16.0, help="publishing time")
    ap.add_argument("--kill-at", type=float, default=5.0, help="s after the start: kill -9 the victim")
    ap.add_argument("--restart-at", type=float, default=10.0, help="s after the start: start it again")
    ap.add_argument("--drain", type=float, default=15.0, help="max s after publishing for pending acks")
    ap.add_argument("--settle", type=float, default=20.0, help="max s for the stream to converge")
    ap.add_argument("--inflight", type=int, default=20, help="paho max_inflight_messages")
    ap.add_argument(
        "--watchdog",
        type=float,
        default=5.0,
        help="MQTT publisher drops its connection after this many s without a PUBACK "
        "while messages wait (0: off)",
    )
    ap.add_argument(
        "--sub-wait",
        type=float,
        default=40.0,
        help="max s to wait for the MQTT session subscriber to receive every acked reading",
    )
    ap.add_argument("--js-msg-id", action="store_true", help="js publisher sets Nats-Msg-Id (dedupe)")
    ap.add_argument("--mqtt-extra", default="", help='extra mqtt{} options, e.g. "stream_replicas: 3"')
    ap.add_argument("--workdir", default=None, help="parent of the temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (node logs)")
    args = ap.parse_args()
    if args.list or not args.case:
        for k, c in CASES.items():
            print(f"{k:28} {c.help}")
        print(f"{'probe-mapping':28} question 1: mapping of MQTT and JS publishes, partitions, odd ids")
        print(f"{'probe-mqtt-msgs':28} question 3: when $MQTT_msgs stores QoS1 publishes; sourcing")
        print(f"{'probe-unified':28} our own $MQTT_msgs fed by MQTT and (second mapping) js.publish")
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130
    finally:
        _kill_children()


if __name__ == "__main__":
    sys.exit(main())
