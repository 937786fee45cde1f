"""End-to-end harness: private Mosquitto brokers, MQTT test clients, the service under test.

* :class:`Broker` — a private ``mosquitto`` on a free port with its own persistence directory and
  big queues, for tests that stop/restart the broker or queue many messages for an absent client;
  more listeners (TLS, passwords: ``test_tls``) through ``extra_config``.
* :class:`Collector` — subscribes to the service's outputs and keeps every message in arrival order.
* :class:`Publisher` — publishes readings at QoS1 and waits for the broker's acknowledgements.
* :func:`service_settings` — unique topics and client id per test (tests never see each other's
  traffic or sessions, on the shared broker too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from service.app import create_app
from service.settings import Settings, load_settings
from tests.support import ADMIN_TOKEN, wait_until

SHARED_BROKER = ("127.0.0.1", 1883)
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(k: int) -> list[int]:
    """``k`` distinct free ports: held together while picked (one at a time, the kernel may hand a
    just-released port out again — a NATS node's monitor once got another node's route port)."""
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    """A private Mosquitto (persistent sessions survive :meth:`stop` + :meth:`start` on the same port).

    ``extra_config`` lines are appended to the generated configuration (e.g. a second ``listener``
    with its TLS and password settings); with ``per_listener_settings`` each listener has its own
    security settings, so the anonymous plain listener on :attr:`port` (the test clients') stays
    open beside a listener that requires a password.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_config: Sequence[str] = (),
        per_listener_settings: bool = False,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        # per_listener_settings must precede the listeners it applies to.
        lines = ["per_listener_settings true"] if per_listener_settings else []
        lines += [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "max_queued_messages 100000",
            "max_inflight_messages 1000",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot write the temp dir
        lines += extra_config
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def reload(self) -> None:
        """``SIGHUP``: mosquitto reads its configuration again (password files included), keeping
        its connections."""
        assert self.proc is not None, "not started"
        assert self.proc.poll() is None, "not running"
        self.proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def stop(self) -> None:
        """Stop (SIGTERM: mosquitto writes its persistence file) and wait for the port to close."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass(frozen=True)
class Names:
    """Unique topics and client ids of one test."""

    ns: str

    @property
    def prefix(self) -> str:
        return f"sw{self.ns}"

    @property
    def readings(self) -> str:
        return f"t{self.ns}/+/readings"

    @property
    def client_id(self) -> str:
        return f"svc-{self.ns}"

    def topic(self, device: str) -> str:
        return f"t{self.ns}/{device}/readings"


def new_names() -> Names:
    return Names(uuid.uuid4().hex[:10])


def service_settings(names: Names, tmp_path: Path, mqtt_url: str, **overrides: Any) -> Settings:
    params: dict[str, Any] = {
        "mqtt_url": mqtt_url,
        "mqtt_client_id": names.client_id,
        "topic_readings": names.readings,
        "topic_prefix": names.prefix,
        "admin_token": ADMIN_TOKEN,
        "state_dir": tmp_path / "state",
        "models_dir": tmp_path / "models",
        "snapshot_interval_s": 0,
        **overrides,
    }
    return load_settings(**params)


@contextlib.contextmanager
def running_service(settings: Settings, ready_timeout: float = 20.0) -> Iterator[TestClient]:
    """The app with its lifespan (MQTT adapter + batcher) until the block ends (graceful stop)."""
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, ready_timeout, "/readyz 200")
        yield client


def _v5_client(client_id: str) -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)


def _connect(client: paho.Client, host: str, port: int, timeout: float = 10.0) -> None:
    connected = threading.Event()

    def on_connect(c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            connected.set()

    client.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    # Without it Mosquitto keeps only 20 QoS1 messages in flight to us (max_inflight_messages) and
    # queues 1000 more before dropping: a test client must never be the bottleneck.
    props.ReceiveMaximum = 65535
    client.connect(host, port, keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    if not connected.wait(timeout):
        raise RuntimeError(f"test client could not connect to {host}:{port}")


class Collector:
    """Subscribes to ``PREFIX/#`` and records every message (topic, payload) in arrival order."""

    def __init__(self, prefix: str, host: str = SHARED_BROKER[0], port: int = SHARED_BROKER[1]) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes, bool]] = []
        self._counts: Counter[str] = Counter()
        self.client = _v5_client(f"col-{uuid.uuid4().hex[:12]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a, **k: subscribed.set()
        _connect(self.client, host, port)
        self.client.subscribe(f"{prefix}/#", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        kind = msg.topic[len(self.prefix) + 1 :].split("/", 1)[0]
        with self._lock:
            self._messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._counts[kind] += 1

    def messages(self, kind: str) -> list[tuple[str, bytes, bool]]:
        """Messages under ``PREFIX/kind`` (``scores``, ``anomalies``, ``deadletter``, ``status``)."""
        base = f"{self.prefix}/{kind}"
        with self._lock:
            return [m for m in self._messages if m[0] == base or m[0].startswith(base + "/")]

    def docs(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(p) for _, p, _ in self.messages(kind)]

    def count(self, kind: str) -> int:
        with self._lock:
            return self._counts[kind]

    def outcomes(self) -> int:
        """Results (scores) + rejections (dead letters) seen so far."""
        return self.count("scores") + self.count("deadletter")

    def statuses(self) -> list[str]:
        return [p.decode() for _, p, _ in self.messages("status")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """QoS1 publisher; :meth:`wait_acked` waits until the broker acknowledged everything published."""

    def __init__(self, host: str = SHARED_BROKER[0], port: int = SHARED_BROKER[1]) -> None:
        self.client = _v5_client(f"pub-{uuid.uuid4().hex[:12]}")
        self.client.max_inflight_messages_set(1000)
        _connect(self.client, host, port)
        self._infos: list[paho.MQTTMessageInfo] = []
        self._lock = threading.Lock()

    def publish(
        self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1, retain: bool = False
    ) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        with self._lock:
            self._infos.append(info)

    @property
    def published(self) -> int:
        with self._lock:
            return len(self._infos)

    def wait_acked(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            infos = list(self._infos)
        for info in infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a reading"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_paced(
    publisher: Publisher,
    messages: Iterable[tuple[str, dict[str, Any] | bytes]],
    outcomes: Callable[[], int],
    window: int = 400,
    timeout: float = 120.0,
) -> int:
    """Publish, keeping at most ``window`` readings ahead of the outcomes seen (a gateway batch
    ``{"readings": [...]}`` counts its readings).

    Mosquitto's defaults keep at most 1,000 QoS1 messages queued per client beyond those in flight
    and drop the rest ("Outgoing messages are being dropped"): a test that bursts 10,000 readings at
    the shared broker would measure the broker's limits, not the service.
    """
    deadline = time.monotonic() + timeout
    n = 0
    for topic, payload in messages:
        while n - outcomes() >= window:
            if time.monotonic() > deadline:
                raise AssertionError(f"service fell behind: {n} published, {outcomes()} outcomes")
            time.sleep(0.002)
        publisher.publish(topic, payload)
        n += len(payload["readings"]) if isinstance(payload, dict) and "readings" in payload else 1
    return n


def duplicates(keys: Iterable[Any]) -> dict[Any, int]:
    return {k: c for k, c in Counter(keys).items() if c > 1}
