"""``sensorwatch simulate --mqtt-url`` as a subprocess against a private Mosquitto (its fixed
``sensors/+/readings`` topics must not reach a service on the shared broker): SIGTERM (``docker
stop``) stops it as cleanly as Ctrl-C — the tick ends, everything published is delivered, the client
disconnects, exit status 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.e2e.harness import Broker, _connect, _v5_client
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]


class ReadingCounter:
    """Counts QoS1 messages on ``sensors/+/readings``."""

    def __init__(self, broker: Broker) -> None:
        self.n = 0
        self.stamps: list[float] = []
        self._lock = threading.Lock()
        self.client = _v5_client(f"simcount-{uuid.uuid4().hex[:12]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a, **k: subscribed.set()
        _connect(self.client, broker.host, broker.port)
        self.client.subscribe("sensors/+/readings", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        ts = float(json.loads(msg.payload)["ts"])
        with self._lock:
            self.n += 1
            self.stamps.append(ts - time.time())

    @property
    def count(self) -> int:
        with self._lock:
            return self.n

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_simulator_stops_cleanly_on_signal(private_broker: Broker, tmp_path: Path, sig: int) -> None:
    counter = ReadingCounter(private_broker)
    err = tmp_path / "simulate.err"
    argv = [
        sys.executable,
        "-m",
        "service.cli",
        "simulate",
        "--mqtt-url",
        private_broker.url,
        "--devices",
        "5",
        "--rate",
        "20",
        "--seed",
        str(uuid.uuid4().int % 10**6),
    ]
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:

        def publishing() -> bool:
            assert proc.poll() is None, err.read_text()
            return counter.count >= 20

        wait_until(publishing, 30, "the simulator's readings")
        proc.send_signal(sig)
        started = time.monotonic()
        rc = proc.wait(10)
        assert rc == 0, err.read_text()
        assert time.monotonic() - started < 5
        found = re.search(r"simulator: published (\d+) readings from 5 devices", err.read_text())
        assert found, err.read_text()
        assert "Traceback" not in err.read_text()
        published = int(found.group(1))
        assert published > 0
        assert published % 5 == 0  # whole ticks only
        # Flushed before the disconnect: every reading it counted reached the broker (QoS1).
        wait_until(lambda: counter.count >= published, 10, f"{published} readings at the subscriber")
        time.sleep(0.2)
        assert counter.count == published
        # Wall-clock timestamps (time lapse 1): a rerun, or a service restored from a snapshot, stays in
        # order. Within ±5 s of the receiver's clock (20 % jitter per tick at 20 ticks/s).
        with counter._lock:
            lags = list(counter.stamps)
        assert max(abs(x) for x in lags) < 5.0, (min(lags), max(lags))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        counter.close()
