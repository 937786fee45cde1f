"""The test bed of cluster mode (issue #14, scope 4; cluster mode itself is not built yet): three
nats-server nodes form a JetStream cluster, MQTT 3.1.1 QoS1 messages published to one node's MQTT
listener reach a subscriber on another node's, and after kill -9 of the JetStream meta leader the
two others elect a new one and still carry MQTT (a measurement for now: see its skip reason)."""

from __future__ import annotations

import os
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.cluster.nats import NatsCluster, NatsNode
from tests.support import wait_until


def _client(node: NatsNode, name: str, timeout: float = 10.0) -> paho.Client:
    """A connected MQTT 3.1.1 client. NATS answers CONNECT only once its MQTT JetStream assets are
    available: after a node's death that waits for their new stream leaders (seen: up to ~10 s)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv311, clean_session=True)
    connected = threading.Event()
    c.on_connect = lambda cl, u, flags, rc, props=None: rc.is_failure or connected.set()
    c.connect_async("127.0.0.1", node.mqtt_port, keepalive=30)
    c.loop_start()
    assert connected.wait(timeout), f"no CONNACK from {node.name} within {timeout:.0f} s"
    return c


def _relay(src: NatsNode, dst: NatsNode, tag: str, n: int = 100, timeout: float = 10.0) -> list[bytes]:
    """Publish ``n`` QoS1 messages on ``src``; what a subscriber on ``dst`` received."""
    got: list[bytes] = []
    sub = _client(dst, f"sub-{tag}", timeout)
    subscribed = threading.Event()
    sub.on_message = lambda c, u, msg: got.append(bytes(msg.payload))
    sub.on_subscribe = lambda *a, **k: subscribed.set()
    sub.subscribe(f"sensors/+/{tag}", qos=1)
    assert subscribed.wait(10)
    time.sleep(0.5)  # the subscription's interest reaches the other nodes
    pub = _client(src, f"pub-{tag}", timeout)
    infos = [pub.publish(f"sensors/d{i % 7}/{tag}", f"{i}".encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    wait_until(lambda: len(got) >= n, 10, f"{n} messages on {dst.name}")
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return got


def test_three_nodes_form_a_jetstream_cluster_and_carry_mqtt_qos1(nats_cluster: NatsCluster) -> None:
    a, _, c = nats_cluster.nodes
    leader = nats_cluster.wait_leader()
    assert leader in {"n1", "n2", "n3"}
    assert sorted(_relay(a, c, "relay"), key=int) == [str(i).encode() for i in range(100)]


@pytest.mark.skipif(
    not os.environ.get("CLUSTER_KILL_TEST"),
    reason="a measurement, not yet a gate: MQTT through the survivors after the meta leader's death took "
    "11-24 s on nats-server 2.9.10 and 12.7-33.6 s on 2.15.1, where 2 of 6 runs timed out "
    "(CLUSTER_KILL_TEST=1 runs it; issue #14)",
)
def test_after_kill9_of_the_meta_leader_the_others_elect_one_and_still_carry_mqtt(
    nats_cluster: NatsCluster,
) -> None:
    leader = nats_cluster.wait_leader()
    dead = next(n for n in nats_cluster.nodes if n.name == leader)
    dead.kill9()
    started = time.monotonic()
    survivors = [n for n in nats_cluster.nodes if n is not dead]
    new = nats_cluster.wait_leader(20, survivors, not_=leader)
    elected_s = time.monotonic() - started
    print(f"\nmeta leader {leader} killed; {new} elected in {elected_s:.1f} s")
    assert new != leader
    relayed = _relay(survivors[0], survivors[1], "after", timeout=30.0)
    print(f"MQTT through the two survivors again {time.monotonic() - started:.1f} s after the kill")
    assert len(relayed) == 100
