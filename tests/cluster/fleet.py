"""What the cluster-mode tests drive and check: worker processes, a fleet of MQTT QoS1 publishers on
several NATS nodes, the outputs stream read back, the checkpoints restored, and a single-process
reference run to compare the final device states with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as paho
from nats.js import api
from paho.mqtt.enums import CallbackAPIVersion

from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.scoring.batch import Reading
from sensorwatch.scoring.scorer import StreamScorer
from service.cluster.partition import PartitionState
from service.cluster.topology import OUTPUTS_STREAM, Topology
from service.metrics import Metrics
from service.settings import Settings, scorer_config
from tests.cluster.nats import NatsCluster, NatsNode
from tests.e2e.procs import ServiceProcess

BASE_TS = 1_700_000_000.0


def worker(cluster: NatsCluster, log_dir: Path, name: str, **env: str) -> ServiceProcess:
    settings = {
        "SENSORWATCH_NATS_URL": cluster.urls,
        "SENSORWATCH_WORKER_ID": name,
        "SENSORWATCH_PUBLISH_SCORES": "true",
        "SENSORWATCH_LEASE_TTL_S": "3",
        "SENSORWATCH_CHECKPOINT_INTERVAL_S": "2",
        "SENSORWATCH_STATE_DIR": "",
        "SENSORWATCH_TORCH_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # a hung worker dumps its threads on SIGABRT
        **env,
    }
    return ServiceProcess(settings, log_dir, name=name)


def reading_value(device: int, i: int) -> float:
    """A daily sine with noise and a spike now and then: deterministic per (device, i)."""
    rng = random.Random(device * 100_003 + i)
    v = 3.0 * math.sin(2 * math.pi * i / 48) + rng.gauss(0, 0.2) + device
    return v + (25.0 if i % 97 == 61 else 0.0)


@dataclass
class Fleet:
    """``devices`` MQTT 3.1.1 QoS1 publishers spread over ``nodes``, each publishing its readings in
    order; a reading counts as sent once its PUBACK came back (paho resends unacked ones after a
    reconnect, to whichever node it reconnects to)."""

    nodes: list[NatsNode]
    devices: int
    readings: int
    acked: dict[str, set[int]] = field(default_factory=dict)
    clients: list[paho.Client] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def device(self, d: int) -> str:
        return f"dev-{d:03d}"

    def run(self, seconds: float, during: list[tuple[float, Any]] | None = None) -> None:
        """Publish every reading over about ``seconds``; ``during``: (fraction of the run, action)."""
        pending = sorted(during or [], key=lambda x: x[0])
        clients = [self._client(n, k) for k, n in enumerate(self.nodes)]
        self.clients = clients
        step = seconds / self.readings
        started = time.monotonic()
        for i in range(self.readings):
            while pending and i >= pending[0][0] * self.readings:
                pending.pop(0)[1]()
            for d in range(self.devices):
                c = clients[d % len(clients)]
                payload = json.dumps({"ts": BASE_TS + 60.0 * i, "values": [reading_value(d, i)]})
                info = c.publish(f"sensors/{self.device(d)}/readings", payload, qos=1)
                c._sw_mids[info.mid] = (self.device(d), i)  # type: ignore[attr-defined]
            lag = started + (i + 1) * step - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        for action in pending:
            action[1]()

    def wait_acked(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        total = self.devices * self.readings
        while time.monotonic() < deadline and self.acked_count() < total:
            time.sleep(0.1)
        return self.acked_count()

    def acked_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.acked.values())

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()

    def _client(self, node: NatsNode, k: int) -> paho.Client:
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fleet-{k}", protocol=paho.MQTTv311, clean_session=False
        )
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c._sw_mids = {}  # type: ignore[attr-defined]
        connected = threading.Event()

        def on_connect(cl: paho.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if not rc.is_failure:
                connected.set()

        def on_publish(cl: paho.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
            key = cl._sw_mids.pop(mid, None)  # type: ignore[attr-defined]
            if key is not None:
                with self._lock:
                    self.acked.setdefault(key[0], set()).add(key[1])

        c.on_connect = on_connect
        c.on_publish = on_publish
        others = [n for n in self.nodes if n is not node]
        c.connect_async("127.0.0.1", node.mqtt_port, keepalive=10)
        c.reconnect_delay_set(1, 2)
        c._sw_nodes = [node, *others]  # type: ignore[attr-defined]
        c.loop_start()
        assert connected.wait(20), f"fleet client not connected to {node.name}"
        return c


def read_outputs(cluster: NatsCluster, timeout: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
    """Every message of the outputs stream: (subject, document)."""

    async def main() -> list[tuple[str, dict[str, Any]]]:
        nc = await nats.connect(servers=cluster.urls.split(","))
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(OUTPUTS_STREAM)
        total = info.state.messages
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE, inactive_threshold=30
        )
        sub = await js.pull_subscribe(">", stream=OUTPUTS_STREAM, config=cfg)
        out: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while len(out) < total and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(5000, timeout=1)
            except nats.errors.TimeoutError:
                continue
            out.extend((m.subject, json.loads(m.data)) for m in msgs)
        await nc.close()
        return out

    return asyncio.run(main())


def stored_readings(cluster: NatsCluster) -> set[tuple[str, float]]:
    """(device, ts) of every reading the readings stream holds."""
    from service.cluster.topology import READINGS_STREAM

    async def main() -> set[tuple[str, float]]:
        nc = await nats.connect(servers=cluster.urls.split(","))
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(READINGS_STREAM, subjects_filter="$MQTT.msgs.sw.in.>")
        total = sum((info.state.subjects or {}).values())
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE, inactive_threshold=30
        )
        sub = await js.pull_subscribe("$MQTT.msgs.sw.in.>", stream=READINGS_STREAM, config=cfg)
        out: set[tuple[str, float]] = set()
        seen = 0
        deadline = time.monotonic() + 30
        while seen < total and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(5000, timeout=1)
            except nats.errors.TimeoutError:
                continue
            seen += len(msgs)
            for m in msgs:
                out.add((Topology.device_of(m.subject) or "?", float(json.loads(m.data)["ts"])))
        await nc.close()
        return out

    return asyncio.run(main())


def read_checkpoints(cluster: NatsCluster, partitions: int, group: str = "sensorwatch") -> dict[int, bytes]:
    async def main() -> dict[int, bytes]:
        nc = await nats.connect(servers=cluster.urls.split(","))
        js = nc.jetstream(timeout=10)
        obs = await js.object_store(
            Topology("sensors/+/readings", "sensorwatch", partitions, group).checkpoints_bucket
        )
        out = {}
        for p in range(partitions + 1):
            with contextlib.suppress(nats.js.errors.ObjectNotFoundError):
                out[p] = (await obs.get(Topology.checkpoint_name(p))).data or b""
        await nc.close()
        return out

    return asyncio.run(main())


def restored_states(checkpoints: dict[int, bytes], partitions: int) -> dict[str, dict[str, np.ndarray]]:
    """Every device's state in the checkpoints, by device id (each in exactly one partition)."""
    settings = Settings(nats_url="nats://127.0.0.1:1", state_dir=None)
    model, version = load_default_or_builtin(None, settings.models_dir, channels=1)
    topo = Topology("sensors/+/readings", "sensorwatch", partitions, "sensorwatch")
    out: dict[str, dict[str, np.ndarray]] = {}
    for p, data in checkpoints.items():
        state = PartitionState(
            p, topo, settings, model, scorer_config(settings), version, Metrics(cluster=True)
        )
        state.restore(data)
        for device in state.scorer.store.device_ids():
            assert device not in out, f"{device} in two partitions' checkpoints"
            row = state.scorer.state_of(device)
            assert row is not None
            out[device] = row
    return out


def reference_states(devices: list[str], readings: int) -> dict[str, dict[str, np.ndarray]]:
    """The same readings through one StreamScorer in one process, each device in order."""
    settings = Settings(nats_url="nats://127.0.0.1:1", state_dir=None)
    model, version = load_default_or_builtin(None, settings.models_dir, channels=1)
    scorer = StreamScorer(model, scorer_config(settings), model_version=version, clock=time.time)
    for i in range(readings):
        scorer.step(
            [Reading(dev, BASE_TS + 60.0 * i, [reading_value(d, i)]) for d, dev in _numbered(devices)]
        )
    out = {}
    for dev in devices:
        row = scorer.state_of(dev)
        assert row is not None
        out[dev] = row
    return out


def _numbered(devices: list[str]) -> list[tuple[int, str]]:
    return [(int(dev.split("-")[1]), dev) for dev in devices]


def handoffs(procs: list[ServiceProcess]) -> list[dict[str, Any]]:
    """Every ownership change the workers logged (``handoff {json}`` lines), in time order."""
    events = []
    for proc in procs:
        for line in proc.log_lines("handoff {"):
            events.append(json.loads(line.split("handoff ", 1)[1]))
    return sorted(events, key=lambda e: e["at"])


@dataclass
class JetStreamFleet:
    """Gateways publishing through the JetStream API (nats-py ``js.publish``): a reading counts as sent
    once the stream acknowledged it (stored on a majority of its replicas). Each device publishes in
    order, one reading at a time; an unacknowledged one is sent again with the same ``Nats-Msg-Id``,
    which the stream recognises within its duplicate window (a retry after a lost ack is stored once)."""

    urls: list[str]
    devices: int
    readings: int
    acked: dict[str, set[int]] = field(default_factory=dict)
    retries: int = 0
    longest_wait_s: float = 0.0

    def device(self, d: int) -> str:
        return f"dev-{d:03d}"

    def run(self, seconds: float, during: list[tuple[float, Any]] | None = None) -> None:
        timers = [threading.Timer(at * seconds, action) for at, action in during or []]
        for t in timers:
            t.start()
        try:
            asyncio.run(self._main(seconds))
        finally:
            for t in timers:
                t.join()

    async def _main(self, seconds: float) -> None:
        nc = await nats.connect(servers=self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream(timeout=2)
        step = seconds / self.readings
        started = time.monotonic()
        await asyncio.gather(*(self._device(js, d, started, step) for d in range(self.devices)))
        await nc.close()

    async def _device(self, js: Any, d: int, started: float, step: float) -> None:
        dev = self.device(d)
        for i in range(self.readings):
            lag = started + i * step - time.monotonic()
            if lag > 0:
                await asyncio.sleep(lag)
            payload = json.dumps({"ts": BASE_TS + 60.0 * i, "values": [reading_value(d, i)]}).encode()
            first = time.monotonic()
            while True:
                try:
                    await js.publish(
                        Topology.gateway_subject(dev), payload, headers={"Nats-Msg-Id": f"{dev}/{i}"}
                    )
                    break
                except (nats.errors.Error, TimeoutError):
                    self.retries += 1
                    await asyncio.sleep(0.1)
            self.longest_wait_s = max(self.longest_wait_s, time.monotonic() - first)
            self.acked.setdefault(dev, set()).add(i)

    def wait_acked(self, timeout: float) -> int:
        return sum(len(v) for v in self.acked.values())

    def close(self) -> None:
        """Nothing stays open after :meth:`run`."""
