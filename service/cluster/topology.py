"""The names cluster mode uses, in one place, and the partition mapping every NATS server needs.

Devices publish MQTT ``sensors/<device>/readings``; NATS sees the subject ``sensors.<device>.readings``
and the servers' mapping (:func:`server_mappings`) rewrites it to ``sw.in.<p>.<device>``, where ``p`` is
a hash of the device id modulo the partition count (``partition(P, 1)``: deterministic, the same on
every node). The readings stream stores ``sw.in.>``, so one partition is one filtered, ordered slice of
it; a worker owning ``p`` consumes ``sw.in.<p>.*`` in stream order. Anything published under
``sensors.>`` that the mapping did not rewrite (a topic that does not fit) is stored too, as the extra
*unrouted* partition ``P``, whose owner dead-letters it: nothing is dropped silently.

>>> from service.cluster.topology import Topology
>>> t = Topology("sensors/+/readings", "sensorwatch", partitions=12, group="fleet")
>>> t.filter_subject(3), t.filter_subject(12)
('sw.in.3.*', 'sensors.>')
>>> t.device_of("sw.in.3.pump-7"), t.output_subject("sensorwatch/anomalies/pump-7")
('pump-7', 'sensorwatch.anomalies.pump-7')
>>> print(t.server_mappings())
mappings = {
  "sensors.*.readings": "sw.in.{{partition(12,1)}}.{{wildcard(1)}}"
}
"""

from __future__ import annotations

from dataclasses import dataclass

READINGS_STREAM = "SENSORWATCH_READINGS"
OUTPUTS_STREAM = "SENSORWATCH_OUTPUTS"
INPUT_PREFIX = "sw.in"


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

    def server_mappings(self) -> str:
        """The ``mappings`` block every NATS server of the cluster needs (its account's, or the
        top level for the default account): without it every reading lands in the unrouted partition."""
        wildcard = 1  # the readings topic has exactly one '+' (settings check it): the first wildcard
        hashed = f"{{{{partition({self.partitions},{wildcard})}}}}"
        target = f"{INPUT_PREFIX}.{hashed}.{{{{wildcard({wildcard})}}}}"
        return f'mappings = {{\n  "{self.readings_subject}": "{target}"\n}}'

    def stream_subjects(self) -> list[str]:
        first = self.readings_subject.split(".")[0]
        return [f"{INPUT_PREFIX}.>", f"{first}.>"]

    def output_subjects(self) -> list[str]:
        p = self.topic_prefix.replace("/", ".")
        return [f"{p}.anomalies.>", f"{p}.scores.>", f"{p}.deadletter"]

    def filter_subject(self, partition: int) -> str:
        if partition == self.unrouted:
            return self.stream_subjects()[1]
        return f"{INPUT_PREFIX}.{partition}.*"

    @staticmethod
    def device_of(subject: str) -> str | None:
        """The device id of a routed reading's subject; None for an unrouted one."""
        parts = subject.split(".", 3)
        if len(parts) == 4 and f"{parts[0]}.{parts[1]}" == INPUT_PREFIX:
            return parts[3]
        return None

    def mqtt_topic(self, subject: str) -> str:
        """The MQTT topic a stored reading was published on (what dead letters and digests name)."""
        device = self.device_of(subject)
        if device is not None:
            return self.topic_readings.replace("+", device)
        return subject.replace(".", "/")

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
