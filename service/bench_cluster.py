"""``sensorwatch bench cluster``: the readings/s of one cluster-mode worker against the single-node
service, on the same machine, in the same run — the cost of coordination (issue #14).

Both drain the same N queued messages (``bench e2e``'s workloads: one reading per message, and
50-reading gateway messages), measured the same way (``bench e2e``'s honest window: ``/metrics``
polled every 50 ms, the clock from the first outcome to the last, start-up excluded):

* **single node**: ``sensorwatch serve`` on a private Mosquitto, exactly as ``bench e2e`` measures it
  (the messages queued in its persistent session while it was stopped).
* **cluster worker**: a private NATS server (JetStream, MQTT listener, the partition mapping from
  ``sensorwatch cluster-config``; ``--nodes 3`` for a 3-node cluster with R3 streams), one worker
  started once so that it creates the streams and buckets and stopped; the same N messages published
  as MQTT QoS1 by a device-like client (PUBACKed = stored in ``$MQTT_msgs``), then the worker started
  again: it acquires every partition, reads the (empty) checkpoints and consumes the backlog.
  Its outcomes are counted as ``sensorwatch_readings_total{source="nats"}``.

``ratio`` = worker / single node, per run; medians of the runs are reported. A worker is a process
like the service (one scoring thread, ``TORCH_THREADS`` 1); on a 2-core machine the NATS server(s)
share the cores with it, as Mosquitto shares them with the service.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service import bench_e2e as e2e
from service.cluster.topology import Topology, nats_server_binary

NATS_SERVER = nats_server_binary()
HEADER = (
    f"{'workload':<12} {'run':>6} {'single node r/s':>16} {'worker r/s':>12} {'worker / single':>16} "
    f"{'worker µs CPU/r':>16}"
)


@contextlib.contextmanager
def private_nats(workdir: Path, nodes: int) -> Iterator[tuple[list[int], list[int]]]:
    """``nodes`` nats-server processes (JetStream, MQTT, the mapping) on free ports: (client ports,
    MQTT ports); killed when the block ends."""
    clients = [e2e.free_port() for _ in range(nodes)]
    mqtts = [e2e.free_port() for _ in range(nodes)]
    routes = [e2e.free_port() for _ in range(nodes)]
    topology = Topology("sensors/+/readings", "sensorwatch", 12, "sensorwatch")
    procs = []
    try:
        for i in range(nodes):
            d = workdir / f"n{i}"
            d.mkdir(parents=True)
            cluster = ""
            if nodes > 1:
                peers = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
                cluster = f"cluster {{ name: bench, listen: 127.0.0.1:{routes[i]}, routes: [{peers}] }}\n"
            (d / "nats.conf").write_text(
                f"server_name: n{i}\nlisten: 127.0.0.1:{clients[i]}\n"
                f'jetstream {{ store_dir: "{d}/js" }}\n{cluster}'
                f"{topology.server_config(f'127.0.0.1:{mqtts[i]}', replicas=min(3, nodes))}\n"
            )
            with open(d / "nats.log", "ab") as log:
                procs.append(
                    subprocess.Popen(  # noqa: S603
                        [NATS_SERVER, "-c", str(d / "nats.conf")], stdout=log, stderr=subprocess.STDOUT
                    )
                )
        deadline = time.monotonic() + 30
        while not all(e2e._port_open(p) for p in clients + mqtts):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise e2e.BenchError(f"nats-server did not start: {e2e._tail(workdir / 'n0' / 'nats.log')}")
            time.sleep(0.05)
        yield clients, mqtts
    finally:
        for p in procs:
            e2e._end(p, 10.0)


def worker_env(opts: e2e.Options, clients: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    env.update(
        SENSORWATCH_NATS_URL=",".join(f"nats://127.0.0.1:{p}" for p in clients),
        SENSORWATCH_WORKER_ID="bench",
        SENSORWATCH_STATE_DIR="",
        SENSORWATCH_ADMIN_TOKEN=secrets.token_urlsafe(24),
    )
    if opts.model:
        env["SENSORWATCH_MODEL"] = opts.model
    env.update(opts.env)
    return env


def worker_drain(opts: e2e.Options, w: e2e.Workload, workdir: Path, nodes: int) -> dict[str, Any]:
    """One worker's drain of N queued messages (see module docstring)."""
    messages = e2e.make_messages(w, "sensors")
    workdir.mkdir(parents=True)
    with private_nats(workdir / "nats", nodes) as (clients, mqtts):
        svc = e2e.ServiceProcess(worker_env(opts, clients), workdir / "worker.log")
        try:
            svc.start()
            svc.wait_ready()
            first_rc = svc.stop()
            publish_s = e2e.publish_all(mqtts[0], "3.1.1", messages)
            svc.start()
            samples = e2e.poll_until(svc, w.readings, source="nats")
        finally:
            last_rc = svc.stop()
    return {**e2e.window(samples, w.readings), "publish_s": publish_s, "exit_codes": [first_rc, last_rc]}


def run(opts: e2e.Options, nodes: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {w.name: [] for w in opts.workloads}
    with tempfile.TemporaryDirectory(prefix="sensorwatch-bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "broker").mkdir()
        with e2e.private_broker(tmp / "broker") as port:
            for r in range(1, opts.runs + 1):
                for w in opts.workloads:
                    tag = f"c{r}{w.name[0]}{secrets.token_hex(3)}"
                    single = e2e.service_drain(opts, port, w, f"{tag}s", tmp / f"{tag}s")
                    worker = worker_drain(opts, w, tmp / f"{tag}w", nodes)
                    row = {
                        "run": r,
                        "single_readings_per_s": single["readings_per_s"],
                        "worker_readings_per_s": worker["readings_per_s"],
                        "ratio": worker["readings_per_s"] / single["readings_per_s"],
                        "worker_cpu_us_per_reading": worker["cpu_us_per_reading"],
                        "single": single,
                        "worker": worker,
                    }
                    e2e._log(
                        f"run {r} {w.name}: single node {single['readings_per_s']:,.0f} r/s, worker "
                        f"{worker['readings_per_s']:,.0f} r/s ({row['ratio']:.2f}x)"
                    )
                    rows[w.name].append(row)
    workloads = []
    for w in opts.workloads:
        runs = rows[w.name]
        workloads.append(
            {
                "name": w.name,
                "devices": w.devices,
                "messages": w.messages,
                "readings_per_message": w.batch,
                **{
                    k: statistics.median(r[k] for r in runs)
                    for k in (
                        "single_readings_per_s",
                        "worker_readings_per_s",
                        "ratio",
                        "worker_cpu_us_per_reading",
                    )
                },
                "runs": runs,
            }
        )
    return {
        "benchmark": "cluster",
        "nats_nodes": nodes,
        "nats_server": subprocess.run(  # noqa: S603
            [NATS_SERVER, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "protocol_single": opts.protocol,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "env": opts.env,
        "workloads": workloads,
    }


def table(report: dict[str, Any]) -> str:
    lines = [HEADER]
    for w in report["workloads"]:
        for r in [*w["runs"], {**w, "run": "median"}]:
            lines.append(
                f"{w['name']:<12} {r['run']!s:>6} {r['single_readings_per_s']:>16,.0f} "
                f"{r['worker_readings_per_s']:>12,.0f} {r['ratio']:>15.2f}x "
                f"{r['worker_cpu_us_per_reading']:>16.0f}"
            )
    lines.append(
        f"{report['nats_server']}, {report['nats_nodes']} node(s); single node on Mosquitto, MQTT "
        f"{report['protocol_single']}; {report['cpus']} CPUs"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        opts = e2e.options(args)
    except ValueError as exc:
        print(f"sensorwatch bench cluster: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(opts, args.nodes)
    except e2e.BenchError as exc:
        print(f"sensorwatch bench cluster: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(table(report))
    return 0
