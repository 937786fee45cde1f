"""Cluster mode end to end (issue #14): a private 3-node NATS cluster, worker processes of
``sensorwatch serve`` in cluster mode, and a fleet publishing MQTT 3.1.1 QoS1 through two nodes.

Each run checks what the issue asks of it:
- every reading a device got a PUBACK for has exactly one distinct outcome (after dedupe by
  ``event_id``), and none has two different ones;
- every device's final state (from the checkpoints the workers wrote on their graceful stop) equals
  a single-process reference run of the same readings (1e-5);
- no partition was owned by two workers at any time (ownership intervals from the workers' logs,
  a killed worker's ending at its kill), and a dead worker's partitions were taken over within 5 s.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.cluster.topology import READINGS_STREAM
from tests.cluster.fleet import (
    BASE_TS,
    Fleet,
    JetStreamFleet,
    handoffs,
    read_checkpoints,
    read_outputs,
    reference_states,
    restored_states,
    stored_readings,
    worker,
)
from tests.cluster.nats import NatsCluster
from tests.e2e.procs import ServiceProcess
from tests.support import wait_until

PARTITIONS = 12
LEASES_STREAM = "KV_sw_sensorwatch_leases"
TAKEOVER_LIMIT_S = 5.0


def _start(procs: list[ServiceProcess]) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.wait_ready(90)


def _owners(procs: list[ServiceProcess]) -> dict[int, str] | None:
    """Who owns what, from each live worker's ``/v1/cluster``; None when a partition shows under two
    workers — the workers are asked one after the other, so a handoff between two answers (A asked
    before its release, B after its acquisition) shows it twice. Whether two workers ever held it at
    once is checked from their handoff logs (``_check_never_twice``)."""
    out: dict[int, str] = {}
    for p in procs:
        if p.running:
            for part in p.get("/v1/cluster").json()["partitions"]:
                if int(part) in out:
                    return None
                out[int(part)] = p.name
    return out


def _converged(procs: list[ServiceProcess]) -> dict[int, str] | None:
    """Every partition owned, by one worker each, and the live workers' shares within one."""
    owners = _owners(procs)
    if owners is None:
        return None
    counts = [list(owners.values()).count(p.name) for p in procs if p.running]
    if len(owners) == PARTITIONS + 1 and max(counts) - min(counts) <= 1:
        return owners
    return None


def _intervals(events: list[dict[str, Any]], killed: dict[str, float], end: float) -> dict[int, list[tuple]]:
    """Per partition: (start, stop, worker) of each ownership."""
    open_: dict[tuple[int, str], float] = {}
    out: dict[int, list[tuple]] = defaultdict(list)
    for e in events:
        key = (e["partition"], e["worker"])
        if e["event"] == "acquired":
            open_[key] = e["at"]
        elif key in open_:
            out[e["partition"]].append((open_.pop(key), e["at"], e["worker"]))
    for (p, w), start in open_.items():
        out[p].append((start, killed.get(w, end), w))
    return out


def _check_outcomes(fleet: Any, outputs: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Every acked reading: exactly one distinct outcome; returns counts for the report."""
    by_reading: dict[tuple[str, float], set[str]] = defaultdict(set)
    copies = 0
    for subject, doc in outputs:
        if ".scores." in subject or subject.endswith(".deadletter"):
            by_reading[(doc["device_id"], float(doc.get("ts", "nan")))].add(doc["event_id"])
            copies += 1
    acked = {(dev, BASE_TS + 60.0 * i) for dev, idx in fleet.acked.items() for i in idx}
    missing = acked - set(by_reading)
    twice = {k: v for k, v in by_reading.items() if len(v) > 1}
    assert not missing, f"{len(missing)} acked readings without an outcome, e.g. {sorted(missing)[:5]}"
    assert not twice, f"{len(twice)} readings with two distinct outcomes, e.g. {list(twice.items())[:3]}"
    return {"acked": len(acked), "outcomes": len(by_reading), "copies": copies}


def _check_states(fleet: Any, cluster: NatsCluster) -> int:
    devices = [fleet.device(d) for d in range(fleet.devices)]
    want = reference_states(devices, fleet.readings)
    # Read until every device shows: soon after a node's restart, one read-back on nats-server 2.15
    # lacked some devices although the store held them all (the same store, started again and read:
    # all 24). The workers have stopped by now, so a later read cannot see a later write.
    for _ in range(10):
        got = restored_states(read_checkpoints(cluster, PARTITIONS), PARTITIONS)
        if set(want) <= set(got):
            break
        time.sleep(1.0)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing, f"devices without a checkpointed state: {missing}"
    assert not extra, f"checkpointed devices the fleet does not have: {extra}"
    for dev in devices:
        for name, ref in want[dev].items():
            np.testing.assert_allclose(got[dev][name], ref, rtol=0, atol=1e-5, err_msg=f"{dev} {name}")
    return len(devices)


def test_kill9_a_worker_and_add_one_under_load(nats_cluster: NatsCluster, tmp_path: Path) -> None:
    logs = tmp_path / "workers"
    procs = [worker(nats_cluster, logs, f"w{i}") for i in (1, 2, 3)]
    joiner = worker(nats_cluster, logs, "w4")
    killed: dict[str, float] = {}
    try:
        _start(procs)
        before = wait_until(lambda: _converged(procs), 30, "all partitions owned")
        fleet = Fleet(nats_cluster.nodes[:2], devices=24, readings=240)
        victim = procs[0]

        def kill() -> None:
            killed[victim.name] = time.time()
            victim.kill9()

        fleet.run(12.0, during=[(0.3, kill), (0.6, joiner.start)])
        live = [*procs[1:], joiner]
        joiner.wait_ready(60)
        assert fleet.wait_acked(30) == fleet.devices * fleet.readings
        after = wait_until(lambda: _converged(live), 30, "partitions owned after the kill and the join")
        counts = _wait_outcomes(fleet, nats_cluster)
        for p in live:
            assert _stop(p) == 0, p.log_tail()
        events = handoffs([*procs, joiner])
        _check_ownership(events, killed, before, victim.name)
        devices = _check_states(fleet, nats_cluster)
        print(f"\ncluster run: {counts}, {devices} device states equal to the reference")
    finally:
        fleet_close = locals().get("fleet")
        if fleet_close is not None:
            fleet_close.close()
        for p in [*procs, joiner]:
            if p.running:
                p.kill9()


def _stop(p: ServiceProcess, timeout: float = 60.0) -> int:
    """Graceful stop; a worker still running after ``timeout`` dumps its threads (faulthandler)."""
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        p.proc.send_signal(signal.SIGABRT)
        p.proc.wait(10)
        raise AssertionError(f"{p.name} did not stop within {timeout:.0f} s:\n{p.log_tail(8000)}") from None


def _wait_outcomes(fleet: Any, cluster: NatsCluster) -> dict[str, int]:
    deadline = time.monotonic() + 60
    while True:
        try:
            return _check_outcomes(fleet, read_outputs(cluster))
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _check_never_twice(events: list[dict[str, Any]], killed: dict[str, float]) -> None:
    """No partition owned by two workers at once: an ownership ends at its release, fence or loss
    (logged by the worker), or at its worker's kill."""
    for p, spans in _intervals(events, killed, time.time()).items():
        spans.sort()
        for (_s1, e1, w1), (s2, _, w2) in itertools.pairwise(spans):
            assert s2 >= e1, f"partition {p} owned by {w1} and {w2} at once ({s2:.3f} < {e1:.3f})"


def _check_ownership(
    events: list[dict[str, Any]], killed: dict[str, float], before: dict[int, str], victim: str
) -> None:
    _check_never_twice(events, killed)
    kill_at = killed[victim]
    takeovers: dict[int, float] = {}
    for p, owner in before.items():
        if owner != victim:
            continue
        later = [
            e["at"] for e in events if e["partition"] == p and e["event"] == "acquired" and e["at"] > kill_at
        ]
        assert later, f"partition {p} of the killed worker never taken over"
        takeovers[p] = min(later) - kill_at
    print(f"\ntakeover after kill -9: {', '.join(f'{t:.2f}' for t in sorted(takeovers.values()))} s")
    slowest = max(takeovers, key=takeovers.__getitem__)
    story = [
        f"{e['at'] - kill_at:+.2f} s {e['event']} by {e['worker']}"
        for e in events
        if e["partition"] == slowest
    ]
    assert takeovers[slowest] <= TAKEOVER_LIMIT_S, (
        f"takeover of partition {slowest} took {takeovers[slowest]:.2f} s; its handoffs: {'; '.join(story)}"
    )


pytestmark = pytest.mark.timeout(300)


def _regained(events: list[dict[str, Any]], kill_at: float) -> str:
    """How long the partitions a node's death took from their owners (fenced: the lease bucket had no
    leader) were unowned: kill → acquired again, per partition."""
    dropped = {e["partition"] for e in events if e["event"] in ("fenced", "lost") and e["at"] > kill_at}
    back = []
    for p in sorted(dropped):
        later = [
            e["at"] for e in events if e["partition"] == p and e["event"] == "acquired" and e["at"] > kill_at
        ]
        back.append(min(later) - kill_at if later else float("inf"))
    if not back:
        return "no partition changed owner"
    return f"{len(back)} partitions fenced and owned again {min(back):.1f}-{max(back):.1f} s after the kill"


def _stream_leader(cluster: NatsCluster, stream: str) -> str:
    import asyncio

    import nats

    async def main() -> str:
        nc = await nats.connect(servers=cluster.urls.split(","))
        info = await nc.jetstream(timeout=10).stream_info(stream)
        await nc.close()
        assert info.cluster is not None
        assert info.cluster.leader
        return str(info.cluster.leader)

    return asyncio.run(main())


#: The further node-kill variants: the same promise through the JetStream API, and the lease
#: bucket's leader (fence and regain). Skipped before the fixture starts a cluster for them.
_GATED = pytest.mark.skipif(
    os.environ.get("CLUSTER_KILL_TEST") != "1", reason="a further node-kill variant: CLUSTER_KILL_TEST=1"
)


@pytest.mark.parametrize(
    ("door", "stream"),
    [
        pytest.param("jetstream", READINGS_STREAM, id="jetstream-readings-leader", marks=_GATED),
        pytest.param("jetstream", LEASES_STREAM, id="jetstream-leases-leader", marks=_GATED),
        pytest.param("mqtt", READINGS_STREAM, id="mqtt-readings-leader"),
        pytest.param("mqtt", LEASES_STREAM, id="mqtt-leases-leader", marks=_GATED),
    ],
)
def test_kill9_a_nats_node_under_load(
    nats_cluster: NatsCluster, tmp_path: Path, door: str, stream: str
) -> None:
    """The node that leads ``stream`` (the readings, or the lease bucket's) dies mid-run; the fleet
    publishes through the two others. Every acknowledged reading must still get exactly one outcome,
    and the states be exact.

    ``mqtt``: plain MQTT QoS1 devices; the PUBACK means the reading is in ``$MQTT_msgs`` (R3), the
    readings stream (service/cluster/topology.py). ``jetstream``: gateways publishing with JetStream
    acks. ``make test`` runs the MQTT door with the readings' leader killed; the others (the same
    promise, and the lease bucket's leader: fence and regain) need ``CLUSTER_KILL_TEST=1``."""
    logs = tmp_path / "workers"
    procs = [worker(nats_cluster, logs, f"w{i}") for i in (1, 2, 3)]
    fleet: Any = None
    try:
        _start(procs)
        wait_until(lambda: _converged(procs), 30, "all partitions owned")
        leader = _stream_leader(nats_cluster, stream)
        lease_leader = _stream_leader(nats_cluster, LEASES_STREAM)
        victim = next(n for n in nats_cluster.nodes if n.name == leader)
        others = [n for n in nats_cluster.nodes if n is not victim]
        if door == "mqtt":
            fleet = Fleet(others, devices=24, readings=240)
        else:
            fleet = JetStreamFleet([n.url for n in others], devices=24, readings=240)
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.time())
            victim.kill9()

        fleet.run(12.0, during=[(0.3, kill)])
        acked = fleet.wait_acked(60)
        victim.start()  # back, so that the stream is whole again (R3) for the read-back
        nats_cluster.wait_leader(60)
        acked_set = {(dev, BASE_TS + 60.0 * i) for dev, idx in fleet.acked.items() for i in idx}
        lost = acked_set - stored_readings(nats_cluster)
        total = fleet.devices * fleet.readings
        print(
            f"\n{door}: {leader} (leading {stream}; lease bucket led by {lease_leader}) killed:"
            f" {acked} of {total} acked, {len(lost)} not stored"
        )
        if door == "jetstream":
            print(f"publisher retries {fleet.retries}, longest wait for an ack {fleet.longest_wait_s:.2f} s")
        assert not lost, f"{len(lost)} acknowledged readings are not in the readings stream"
        counts = _wait_outcomes(fleet, nats_cluster)
        print(f"outcomes: {counts}")
        for p in procs:
            assert _stop(p) == 0, p.log_tail()
        devices = _check_states(fleet, nats_cluster)
        events = handoffs(procs)
        _check_never_twice(events, {})
        print(f"{devices} device states equal to the reference; {_regained(events, killed_at[0])}")
    finally:
        if fleet is not None:
            fleet.close()
        for p in procs:
            if p.running:
                p.kill9()


def test_rest_on_a_worker_routes_readings_through_the_stream(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """``POST /v1/score`` on a worker publishes each device's readings into the readings stream
    (202 with the stream sequences) and the owner scores them like MQTT readings; a dry run is
    refused (409), and a body that is not JSON gets the MQTT intake's reason (400)."""
    import httpx

    proc = worker(nats_cluster, tmp_path / "workers", "w1")
    try:
        _start([proc])
        wait_until(lambda: _converged([proc]), 30, "all partitions owned")
        body = {
            "batch": [
                {
                    "device_id": "rest-a",
                    "readings": [{"ts": BASE_TS + 60 * i, "values": [1.0 + i]} for i in range(3)],
                },
                {"device_id": "rest-b", "readings": [{"ts": BASE_TS, "values": [5.0]}]},
            ]
        }
        r = httpx.post(f"{proc.url}/v1/score", json=body, timeout=10)
        assert r.status_code == 202, r.text
        routed = {x["device_id"]: x for x in r.json()["routed"]}
        assert routed["rest-a"]["readings"] == 3
        assert routed["rest-b"]["readings"] == 1
        assert all(x["stream_seq"] > 0 for x in routed.values())

        def scored() -> list[tuple[str, float]]:
            docs = [d for s, d in read_outputs(nats_cluster) if ".scores." in s]
            got = sorted((d["device_id"], d["ts"]) for d in docs)
            return got if len(got) >= 4 else []

        got = wait_until(scored, 30, "the routed readings' scores")
        assert got == [
            ("rest-a", BASE_TS),
            ("rest-a", BASE_TS + 60),
            ("rest-a", BASE_TS + 120),
            ("rest-b", BASE_TS),
        ]
        dry = httpx.post(f"{proc.url}/v1/score?dry_run=true", json=body, timeout=10)
        assert dry.status_code == 409
        assert dry.json()["reason"] == "dry_run_unsupported"
        bad = httpx.post(f"{proc.url}/v1/score", content=b"[" * 5000, timeout=10)
        assert bad.status_code == 400
        assert bad.json()["reason"] == "too_deep"
    finally:
        if proc.running:
            proc.kill9()


def test_a_worker_whose_parse_process_dies_exits_and_its_partitions_are_taken_over(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Fault injection for the parse process (service/cluster/parsing.py): kill -9 of a worker's
    parse child. The worker says so at once (``/readyz`` 503 with the cause), stops renewing, and
    exits with status 70 for its supervisor after WATCHDOG_EXIT_AFTER_S; the other worker takes
    every partition over once the leases lapse."""
    import httpx

    from service.bench_e2e import child_pids
    from service.runtime import EXIT_FAILED

    a = worker(nats_cluster, tmp_path / "workers", "pa")
    b = worker(nats_cluster, tmp_path / "workers", "pb")
    try:
        _start([a, b])
        wait_until(lambda: _converged([a, b]), 30, "all partitions owned by the two")
        assert a.pid is not None
        children = child_pids(a.pid)
        assert len(children) == 1, children  # the parse process
        os.kill(children[0], signal.SIGKILL)

        def failure() -> str:
            try:
                r = a.get("/readyz", timeout=2)
            except httpx.HTTPError:
                return ""
            return str(r.json().get("failure") or "") if r.status_code == 503 else ""

        why = wait_until(failure, 5, "/readyz naming the failure")
        assert "parse process exited" in why
        assert a.wait_exit(15) == EXIT_FAILED
        owners = wait_until(lambda: _converged([b]), 30, "every partition owned by the survivor")
        assert owners is not None
        assert set(owners.values()) == {"pb"}
    finally:
        for p in (a, b):
            if p.running:
                p.kill9()


#: Debian's nats-server (the machine's own NATS): 2.9.10, older than the workers need.
DEBIAN_NATS = "/usr/sbin/nats-server"


def _debian_server_version() -> tuple[int, int, int] | None:
    """``nats-server: v2.9.10`` read the way a worker reads its server's (worker.server_version)."""
    from nats.aio.client import ServerVersion

    from service.cluster.worker import server_version

    if not os.path.exists(DEBIAN_NATS):
        return None
    out = subprocess.run([DEBIAN_NATS, "--version"], capture_output=True, text=True, check=False).stdout
    return server_version(ServerVersion(out.split()[-1].lstrip("v"))) if out.strip() else None


def test_a_worker_refuses_a_cluster_whose_compare_and_set_is_not_serialised(tmp_path: Path) -> None:
    """On a nats-server older than MIN_SERVER_VERSION, two concurrent compare-and-sets of one lease
    could both succeed (seen here: two workers acquiring one partition within 8-16 ms), so a worker
    on a replicated cluster of such servers exits before it takes any partition, naming the cause."""
    from service.cluster.worker import MIN_SERVER_VERSION

    version = _debian_server_version()
    if version is None or version >= MIN_SERVER_VERSION:
        pytest.skip(f"needs an old nats-server at {DEBIAN_NATS} (found {version})")
    cluster = NatsCluster(tmp_path / "nats", binary=DEBIAN_NATS)
    proc = worker(cluster, tmp_path / "workers", "old")
    try:
        cluster.start()
        proc.start()
        assert proc.wait_exit(90) != 0
        assert "does not serialise compare-and-set" in proc.log_tail(), proc.log_tail()
    finally:
        if proc.running:
            proc.kill9()
        cluster.stop()
