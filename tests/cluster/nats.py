"""A private 3-node NATS cluster (JetStream + MQTT 3.1.1 listeners) on free loopback ports, from
the ``nats-server`` the dev extra installs (``topology.nats_server_binary``) — the test bed of
cluster mode (issue #14, scope 4). Each node has its own JetStream store under the test's directory;
nodes can be killed (``SIGKILL``) and started again on the same ports and store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.cluster.topology import Topology, nats_server_binary
from tests.e2e.harness import free_ports

NATS_SERVER = nats_server_binary()


class NatsNode:
    def __init__(
        self,
        name: str,
        workdir: Path,
        cluster: str,
        ports: list[int],
        extra: Callable[[int], str],
        binary: str = NATS_SERVER,
    ) -> None:
        """``ports``: route (cluster), client, MQTT and monitor ports, distinct from every other node's."""
        self.name = name
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster_port, self.client_port, self.mqtt_port, self.http_port = ports
        self.conf = self.dir / "nats.conf"
        self.log = self.dir / "nats.log"
        self._cluster = cluster
        self._extra = extra
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    def write_conf(self, all_routes: list[int]) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in all_routes)
        self.conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.dir}/js" }}\n'
            f"cluster {{ name: {self._cluster}, listen: 127.0.0.1:{self.cluster_port}, "
            f"routes: [{routes}] }}\n"
            f"{self._extra(self.mqtt_port)}\n"
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )

    def kill9(self) -> None:
        """``SIGKILL`` this node only (never ``pkill``: the machine runs its own nats-server)."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.running:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()

    def meta_leader(self) -> str | None:
        try:
            doc = httpx.get(f"http://127.0.0.1:{self.http_port}/jsz", timeout=1).json()
        except (httpx.HTTPError, ValueError):
            return None
        leader = (doc.get("meta_cluster") or {}).get("leader")
        return str(leader) if leader else None


class NatsCluster:
    """Three nodes routed to each other; :meth:`start` returns once they agree on a JetStream meta leader."""

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        name: str = "swtest",
        partitions: int = 12,
        binary: str = NATS_SERVER,
    ) -> None:
        ports = free_ports(4 * size)
        per_node = [ports[4 * k : 4 * k + 4] for k in range(size)]  # route, client, MQTT, monitor
        routes = [p[0] for p in per_node]
        # Every node maps sensors.<device>.readings to the device's partition (cluster mode's layout).
        topology = Topology("sensors/+/readings", "sensorwatch", partitions, "sensorwatch")

        def extra(mqtt_port: int) -> str:
            return topology.server_config(f"127.0.0.1:{mqtt_port}")

        self.nodes = [
            NatsNode(f"n{i}", workdir / f"n{i}", name, p, extra, binary) for i, p in enumerate(per_node, 1)
        ]
        for node in self.nodes:
            node.write_conf(routes)

    @property
    def urls(self) -> str:
        """``SENSORWATCH_NATS_URL`` form: comma-separated servers."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self.wait_leader(timeout)

    def wait_leader(
        self, timeout: float = 30.0, nodes: list[NatsNode] | None = None, not_: str | None = None
    ) -> str:
        """The meta leader all the given (running) nodes agree on (other than ``not_``: a dead one
        they still name until they notice)."""
        members = nodes or [n for n in self.nodes if n.running]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = {n.meta_leader() for n in members}
            if len(leaders) == 1 and None not in leaders and not_ not in leaders:
                return str(leaders.pop())
            time.sleep(0.1)
        logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-1500:]}" for n in members if n.log.exists())
        raise AssertionError(f"no JetStream meta leader agreed within {timeout:.0f} s\n{logs}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def nats_available() -> bool:
    return os.path.exists(NATS_SERVER)
