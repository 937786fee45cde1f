"""Fault injection at every step of the durability protocol (``SENSORWATCH_TEST_KILL_AT``).

Each test streams the same QoS1 readings through a real ``sensorwatch serve`` process and the shared
Mosquitto, has the service kill itself (SIGKILL) at one protocol step, restarts it on the same state
dir and client id, and checks that (a) every reading got an outcome, (b) after dedupe by ``event_id``
each reading has exactly one distinct outcome, the same as an uninterrupted run's (likelihood and raw
score within 1e-5), (c) nothing was applied twice (no ``duplicate_timestamp`` / ``out_of_order``), and
(d) after a graceful stop every device's state in the snapshot equals the uninterrupted run's.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sensorwatch.state.store import DeviceStateStore
from tests.e2e.harness import SHARED_BROKER, Collector, Names, Publisher, new_names, port_open
from tests.e2e.procs import ServiceProcess
from tests.support import wait_until

pytestmark = pytest.mark.slow

T0 = 1_767_225_600.0
DEVICES = [f"f{i}" for i in range(8)]
PER_DEVICE = 80
TOL = 1e-5


def stream() -> list[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng(7)
    out = []
    for k in range(PER_DEVICE):
        for j, d in enumerate(DEVICES):
            v = 20 + 3 * np.sin((k + 5 * j) / 8) + rng.normal(0, 0.2) + (30.0 if k == 70 and j % 2 else 0.0)
            out.append((d, {"ts": T0 + 60 * k, "values": [round(float(v), 6)]}))
    return out


@dataclass
class Run:
    scores: dict[tuple[str, float], dict[str, Any]]
    dead: list[dict[str, Any]]
    state: dict[str, dict[str, torch.Tensor]]
    log: str


def env_for(names: Names, state: Path, **extra: str) -> dict[str, str]:
    return {
        "SENSORWATCH_MQTT_URL": "mqtt://{}:{}".format(*SHARED_BROKER),
        "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
        "SENSORWATCH_TOPIC_READINGS": names.readings,
        "SENSORWATCH_TOPIC_PREFIX": names.prefix,
        "SENSORWATCH_STATE_DIR": str(state),
        "SENSORWATCH_PUBLISH_SCORES": "true",
        "SENSORWATCH_MODEL": "builtin",
        "SENSORWATCH_SNAPSHOT_INTERVAL_S": "0",
        **extra,
    }


def run(tmp: Path, kills: list[str], **extra: str) -> Run:
    """Stream everything; the first start carries ``kills[0]``, the next ``kills[1]``, … then a
    normal start runs to the end and stops gracefully."""
    if not port_open(*SHARED_BROKER):
        pytest.fail("no MQTT broker on 127.0.0.1:1883 (run `make broker`)")
    names, state = new_names(), tmp / "state"
    readings = stream()
    collector, publisher = Collector(names.prefix), Publisher()
    log = ""
    try:
        for i, kill in enumerate([*kills, ""]):
            env = env_for(names, state, **extra, **({"SENSORWATCH_TEST_KILL_AT": kill} if kill else {}))
            with ServiceProcess(env, tmp / "logs", name=f"start{i}") as svc:
                svc.start()
                if i == 0:
                    svc.wait_ready(60)
                    publish_in_bursts(publisher, names, readings)
                if kill:
                    code = svc.wait_exit(60)
                    assert code == -9, (
                        f"{kill}: exited with {code}, not killed at the point:\n{svc.log_tail()}"
                    )
                    log += svc.log_text()
                    continue
                svc.wait_ready(60)
                wait_until(lambda: len(outcomes(collector)) >= len(readings), 60, "every reading's outcome")
                assert svc.stop(60) == 0, svc.log_tail()
                log += svc.log_text()
        publisher.wait_acked()
    finally:
        publisher.close()
        collector.close()
    return Run(deduped(collector), collector.docs("deadletter"), snapshot_state(state), log)


def publish_in_bursts(publisher: Publisher, names: Names, readings: list[tuple[str, dict[str, Any]]]) -> None:
    """Bursts of 40 readings 50 ms apart: many micro-batches and group commits, so every kill point
    is reached a few times during the stream."""
    for i, (d, doc) in enumerate(readings):
        publisher.publish(names.topic(d), json.dumps(doc).encode())
        if i % 40 == 39:
            time.sleep(0.05)


def outcomes(c: Collector) -> set[tuple[str, float]]:
    keys = {(d["device_id"], d["ts"]) for d in c.docs("scores")}
    return keys | {(d.get("device_id"), d.get("ts")) for d in c.docs("deadletter")}


def deduped(c: Collector) -> dict[tuple[str, float], dict[str, Any]]:
    """One score per reading; copies must share the event_id and the numbers (re-publications)."""
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for s in c.docs("scores"):
        by_key[(s["device_id"], s["ts"])].append(s)
    out = {}
    for key, docs in by_key.items():
        ids = {d["event_id"] for d in docs}
        assert len(ids) == 1, f"{key}: {len(ids)} event ids"
        lik = {round(d["likelihood"], 9) for d in docs}
        assert len(lik) == 1, f"{key} scored twice with different results: {docs}"
        assert all(d.get("replayed") for d in docs[1:]), f"{key}: a copy not marked replayed"
        out[key] = docs[0]
    return out


def snapshot_state(state: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, metadata = DeviceStateStore.read_snapshot(state / "state.safetensors")
    ids = json.loads(metadata["ids"])
    return {d: {k: t[i] for k, t in tensors.items() if not k.startswith("_")} for i, d in enumerate(ids)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run(tmp_path_factory.mktemp("reference"), [])


def assert_same_as(got: Run, want: Run) -> None:
    assert len(want.scores) == len(DEVICES) * PER_DEVICE
    assert sorted(got.scores) == sorted(want.scores), "every reading scored"
    bad = [d for d in got.dead if d["reason"] in ("duplicate_timestamp", "out_of_order")]
    assert not bad, f"applied twice: {bad[:3]}"
    diff = [
        k
        for k, w in want.scores.items()
        if abs(got.scores[k]["likelihood"] - w["likelihood"]) > TOL
        or abs(got.scores[k]["raw_score"] - w["raw_score"]) > TOL
    ]
    assert not diff, f"{len(diff)} readings scored differently, first {diff[:5]}"
    assert sorted(got.state) == sorted(want.state)
    for dev, cols in want.state.items():
        for col, t in cols.items():
            u = got.state[dev][col]
            assert torch.allclose(u.double(), t.double(), rtol=1e-5, atol=1e-6, equal_nan=True), (dev, col)


@pytest.mark.parametrize(
    "kill",
    ["wal.before_write:4", "wal.after_write:4", "wal.after_sync:4", "outputs.after_publish:150"],
)
def test_killed_around_a_group_commit_or_before_an_ack(kill: str, tmp_path: Path, reference: Run) -> None:
    got = run(tmp_path, [kill])
    assert_same_as(got, reference)
    if kill.startswith("outputs"):
        assert "redeliver" in got.log or "replayed" in got.log


@pytest.mark.parametrize("kill", ["snapshot.before_rename:1", "snapshot.after_rename:1"])
def test_killed_during_a_snapshot(kill: str, tmp_path: Path, reference: Run) -> None:
    # A snapshot after every ~2 KB of log: several during the stream.
    got = run(tmp_path, [kill], SENSORWATCH_WAL_SNAPSHOT_MB="0.002")
    assert_same_as(got, reference)


def test_killed_during_replay(tmp_path: Path, reference: Run) -> None:
    got = run(tmp_path, ["wal.after_sync:6", "replay.record:2"])
    assert "replayed" in got.log
    assert_same_as(got, reference)
