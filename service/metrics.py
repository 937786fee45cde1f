"""Prometheus metrics of the service — one registry per service instance, never a device id label."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sensorwatch.scoring.batch import KINDS, RejectReason

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LIKELIHOOD_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0)

SOURCES = ("mqtt", "rest", "nats")
OUTCOMES = ("scored", "rejected")
RELOAD_OUTCOMES = ("success", "failure")
#: Reasons the service itself gives (a whole MQTT message or REST request refused, a scoring failure),
#: beside the engine's per-reading :class:`~sensorwatch.scoring.batch.RejectReason` values.
SERVICE_REJECT_REASONS = (
    "payload_too_large",  # MQTT message over max_payload_bytes
    "bad_topic",  # topic does not match topic_readings
    "retained",  # a retained message on the readings topic (mqtt_accept_retained off)
    "bad_device_id",  # invalid device id in the topic
    "malformed_json",  # not UTF-8 JSON
    "too_deep",  # JSON nested deeper than the parser allows (1,024 levels)
    "number_out_of_range",  # a JSON number no float holds (beyond ±1.8e308, or over 4,300 digits)
    "bad_payload",  # JSON, but not a reading / gateway batch
    "too_many_readings",  # message over max_request_readings
    "queue_full",  # REST: the intake queue stayed full (503)
    "internal_error",  # a scorer step failed
)
#: Every ``reason`` label of ``sensorwatch_rejections_total`` (each series exists from the start).
REJECT_REASONS = tuple(dict.fromkeys([*(r.value for r in RejectReason), *SERVICE_REJECT_REASONS]))


class BulkHistogram(Collector):
    """A Prometheus histogram that takes a whole batch of observations in one vectorised call
    (prometheus_client's Histogram takes one value per Python call; a 4,096-reading batch would pay
    for 4,096 calls)."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.doc = name, doc
        self.bounds = np.array(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(self.bounds.size + 1, dtype=np.int64)  # last = +Inf overflow
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], dtype=np.float64))

    def observe_many(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")  # le semantics: value <= bound
        counts = np.bincount(idx, minlength=self.bounds.size + 1)
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(_fmt(b), float(c)) for b, c in zip(self.bounds.tolist(), cumulative, strict=False)]
        buckets.append(("+Inf", float(cumulative[-1])))
        yield HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=total)


def _fmt(b: float) -> str:
    return repr(float(b))


class Metrics:
    """All sensorwatch_* series (names and labels are part of the ops contract: dashboards, alerts)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, mqtt: bool = True, cluster: bool = False
    ) -> None:
        """``mqtt=False`` (a REST-only service): the MQTT series are not exported — a permanent 0 in
        ``sensorwatch_mqtt_connected`` would keep the MQTTDisconnected alert firing for nothing."""
        r = self.registry = registry or CollectorRegistry()
        r_mqtt = r if mqtt else None  # unregistered collectors still accept updates
        self.readings = Counter(
            "sensorwatch_readings",
            "Readings that got an outcome, by door and outcome.",
            ["source", "outcome"],
            registry=r,
        )
        self.rejections = Counter(
            "sensorwatch_rejections", "Rejected readings (or messages) by reason.", ["reason"], registry=r
        )
        self.anomalies = Counter("sensorwatch_anomalies", "Readings flagged as anomalies.", registry=r)
        self.anomaly_events = Counter(
            "sensorwatch_anomaly_events",
            "Anomaly events (a stuck run, an out-of-range stretch or a spike burst is one), by the check "
            "that made them.",
            ["kind"],
            registry=r,
        )
        self.latency = BulkHistogram(
            "sensorwatch_score_latency_seconds",
            "Intake (queued) to scored, per scored reading; rejected readings are not observed.",
            LATENCY_BUCKETS,
            r,
        )
        self.batch_size = BulkHistogram(
            "sensorwatch_batch_size", "Readings per scorer step.", BATCH_BUCKETS, r
        )
        self.queue_depth = Gauge("sensorwatch_queue_depth", "Readings waiting to be scored.", registry=r)
        self.queue_capacity = Gauge(
            "sensorwatch_queue_capacity",
            "Readings the intake queue holds before backpressure (the max_queue setting).",
            registry=r,
        )
        self.max_devices = Gauge(
            "sensorwatch_max_devices",
            "Devices kept in memory before LRU eviction (the max_devices setting).",
            registry=r,
        )
        self.active_devices = Gauge("sensorwatch_active_devices", "Devices with state in memory.", registry=r)
        self.ready = Gauge(
            "sensorwatch_ready",
            "1 while the service can score (what /readyz answers 200 for); 0 once a scoring, output or "
            "MQTT thread died — the process then exits so that its supervisor restarts it.",
            registry=r,
        )
        self.evictions = Counter(
            "sensorwatch_device_evictions", "Devices evicted from memory (LRU or idle TTL).", registry=r
        )
        self.mqtt_connected = Gauge(
            "sensorwatch_mqtt_connected", "1 while connected to the broker.", registry=r_mqtt
        )
        self.mqtt_reconnects = Counter(
            "sensorwatch_mqtt_reconnects", "Connections re-established after a loss.", registry=r_mqtt
        )
        self.model_info = Gauge(
            "sensorwatch_model_info", "The model being served (value 1).", ["name", "version"], registry=r
        )
        self.model_reloads = Counter(
            "sensorwatch_model_reloads", "Model reload attempts by outcome.", ["outcome"], registry=r
        )
        self.likelihood = BulkHistogram(
            "sensorwatch_likelihood", "Anomaly likelihood of scored readings.", LIKELIHOOD_BUCKETS, r
        )
        self.gap_resets = Counter(
            "sensorwatch_gap_resets", "Hidden-state resets after a gap longer than max_gap_s.", registry=r
        )
        self.snapshots = Counter("sensorwatch_state_snapshots", "State snapshots written.", registry=r)
        self.redeliveries = Counter(
            "sensorwatch_redeliveries",
            "MQTT messages redelivered after a crash that were already applied: acked, not scored twice.",
            registry=r_mqtt,
        )
        self.replayed_records = Counter(
            "sensorwatch_wal_replayed_records",
            "Write-ahead log records applied again at start-up.",
            registry=r,
        )
        r_cluster = r if cluster else None
        self.cluster_handoffs = Counter(
            "sensorwatch_cluster_handoffs",
            "Partition ownership changes of this worker: acquired, released (cooperative, checkpointed), "
            "fenced (its lease could not be renewed in time), lost (another worker holds it) or failed (its "
            "consumer stopped).",
            ["kind"],
            registry=r_cluster,
        )
        self.cluster_checkpoints = Counter(
            "sensorwatch_cluster_checkpoints", "Partition checkpoints written.", registry=r_cluster
        )
        self.cluster_checkpoint_seconds = Histogram(
            "sensorwatch_cluster_checkpoint_seconds",
            "Time to write one partition checkpoint (capture + object store).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r_cluster,
        )
        self.cluster_partitions = Gauge(
            "sensorwatch_cluster_partitions_owned", "Partitions this worker owns.", registry=r_cluster
        )
        self.cluster_lag = Gauge(
            "sensorwatch_cluster_consumer_lag",
            "Readings messages stored but not yet consumed, over this worker's partitions.",
            registry=r_cluster,
        )
        self.cluster_members = Gauge(
            "sensorwatch_cluster_members",
            "Live workers of the group as this one sees them.",
            registry=r_cluster,
        )
        if cluster:
            for kind in ("acquired", "released", "fenced", "lost", "failed"):
                self.cluster_handoffs.labels(kind)
        self._registry = r
        # Make every labelled series exist from the start (dashboards and alerts see zeros, not gaps).
        for s in SOURCES:
            for o in OUTCOMES:
                self.readings.labels(s, o)
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)
        for kind in KINDS[1:]:
            self.anomaly_events.labels(kind)
        for outcome in RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome)
        self.mqtt_connected.set(0)

    def watch_engine(self, engine: Any, batcher: Any, outputs: Any) -> None:
        """Series read from the engine at scrape time (the write-ahead log's own counters)."""
        self._registry.register(_EngineCollector(engine, batcher, outputs))

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version).set(1)


class _EngineCollector(Collector):
    def __init__(self, engine: Any, batcher: Any, outputs: Any) -> None:
        self.engine, self.batcher, self.outputs = engine, batcher, outputs

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        wal = self.engine.wal
        yield CounterMetricFamily(
            "sensorwatch_wal_bytes", "Bytes appended to the write-ahead log.", wal.bytes_written if wal else 0
        )
        yield CounterMetricFamily(
            "sensorwatch_wal_syncs",
            "fdatasync calls (group commits) of the write-ahead log.",
            wal.syncs if wal else 0,
        )
        yield GaugeMetricFamily(
            "sensorwatch_wal_pending_records",
            "Records applied but not yet durable.",
            max(0, self.engine.applied_seq - self.engine.durable),
        )
        yield GaugeMetricFamily(
            "sensorwatch_outputs_pending_batches",
            "Scored batches whose outcomes (publish, ack, REST answer) wait for the log or the output stage.",
            self.outputs.depth,
        )
