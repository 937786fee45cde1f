"""The running service: engine + micro-batcher + MQTT adapter + periodic snapshots, and their order
of start and stop."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from sensorwatch.scoring.batch import StepResult
from service.metrics import Metrics
from service.mqtt import InboundMessage, MqttAdapter
from service.payloads import (
    PayloadError,
    anomaly_event,
    deadletter,
    device_from_topic,
    dumps,
    parse_readings,
    result_records,
)
from service.pipeline import Engine, MicroBatcher, QueueFull, Work
from service.settings import Settings

log = logging.getLogger("sensorwatch.service")


class Service:
    """Wires the doors (MQTT, REST) to the one scoring path and the outputs (see :meth:`stop`)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(mqtt=bool(settings.mqtt_url))
        self.engine = Engine(settings, self.metrics)
        self.batcher = MicroBatcher(
            self.engine,
            self.metrics,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )
        self.mqtt: MqttAdapter | None = None
        if settings.mqtt_url:
            self.mqtt = MqttAdapter(settings, self._on_mqtt, self._on_mqtt_change)
        self._intake_open = False
        self._stop_snapshots = threading.Event()
        self._snapshotter = threading.Thread(
            target=self._snapshot_loop, name="sensorwatch-snapshots", daemon=True
        )
        p = settings.topic_prefix
        self.t_anomalies, self.t_scores, self.t_dead = f"{p}/anomalies", f"{p}/scores", f"{p}/deadletter"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        restored = self.engine.restore()
        if restored:
            log.info("restored state of %d devices", restored)
        self.batcher.start()
        self._intake_open = True
        if self.mqtt is not None:
            self.mqtt.start()
        if self.settings.snapshot_interval_s > 0 and self.engine.snapshot_path() is not None:
            self._snapshotter.start()

    @property
    def ready(self) -> bool:
        return self._intake_open and (self.mqtt is None or self.mqtt.connected)

    def stop(self) -> None:
        """Graceful stop. Order matters:

        1. Close intake: later MQTT messages are not acked, so the broker keeps them in our persistent
           session and redelivers them after the restart (nothing acked is ever left unscored).
        2. Drain the micro-batcher: every queued reading is scored, its results published and its
           message acked.
        3. Flush: wait for the broker to acknowledge what we published (anomaly events are QoS1).
        4. Snapshot the state *after* the drain, so the restart continues exactly where we stopped.
        5. Disconnect cleanly, publishing the retained ``offline`` status first (a clean disconnect
           suppresses the last will).
        """
        self._intake_open = False
        drained = self.batcher.close(timeout=60)
        if not drained:
            log.error("micro-batcher did not drain within 60 s")
        if self.mqtt is not None:
            self.mqtt.flush(timeout=10)
        self._stop_snapshots.set()
        path = self.engine.snapshot()
        if path is not None:
            log.info("state of %d devices written to %s", len(self.engine.scorer.store), path)
        if self.mqtt is not None:
            self.mqtt.stop()
        self.metrics.mqtt_connected.set(0)

    def _snapshot_loop(self) -> None:
        while not self._stop_snapshots.wait(self.settings.snapshot_interval_s):
            try:
                self.engine.snapshot()
            except Exception:
                log.exception("periodic state snapshot failed")

    # ------------------------------------------------------------------ MQTT door
    def _on_mqtt_change(self, connected: bool, reconnect: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected and reconnect:
            self.metrics.mqtt_reconnects.inc()

    def _on_mqtt(self, msg: InboundMessage) -> None:
        """Runs on paho's network thread; blocking in ``submit`` is the backpressure."""
        if not self._intake_open:
            return  # not acked: redelivered from the persistent session after the restart
        s = self.settings
        device = device_from_topic(s.topic_readings, msg.topic)
        try:
            if device is None:
                raise PayloadError("bad_topic", f"topic {msg.topic!r} does not match {s.topic_readings!r}")
            readings = parse_readings(
                msg.payload, device, max_bytes=s.max_payload_bytes, max_readings=s.max_request_readings
            )
        except PayloadError as exc:
            self._reject_message(msg, exc.reason, exc.detail, device)
            return
        try:
            self.batcher.submit(Work(readings, "mqtt", functools.partial(self._mqtt_done, msg)))
        except QueueFull:
            return  # shutting down: not acked, redelivered later

    def _reject_message(self, msg: InboundMessage, reason: str, detail: str, device: str | None) -> None:
        self.metrics.readings.labels("mqtt", "rejected").inc()
        self.metrics.rejections.labels(reason).inc()
        self._publish(self.t_dead, deadletter(reason, detail, msg.topic, msg.payload, device_id=device))
        self._ack(msg)

    def _mqtt_done(self, msg: InboundMessage, result: StepResult | None, start: int, stop: int) -> None:
        """Runs on the batcher thread: publish every outcome, then ack the message — always: an unacked
        message would hold one of the broker's in-flight slots for this session until a restart, and
        then be scored a second time."""
        try:
            if result is None:
                self._publish(
                    self.t_dead, deadletter("internal_error", "scoring failed", msg.topic, msg.payload)
                )
                return
            for offset, rec in enumerate(result_records(result, start, stop)):
                try:
                    self._publish_outcome(msg, offset, rec)
                except (ValueError, TypeError) as exc:  # e.g. a NaN that strict JSON refuses
                    log.exception("result of reading %d of %s not publishable", offset, msg.topic)
                    doc = deadletter(
                        "internal_error",
                        f"result not publishable: {exc}",
                        msg.topic,
                        msg.payload,
                        device_id=rec["device_id"],
                        index=offset,
                    )
                    self._publish(self.t_dead, doc)
        finally:
            self._ack(msg)

    def _publish_outcome(self, msg: InboundMessage, offset: int, rec: dict[str, Any]) -> None:
        device = rec["device_id"]
        if not rec["accepted"]:
            doc = deadletter(
                rec["reason"],
                rec["detail"],
                msg.topic,
                msg.payload,
                device_id=device,
                index=offset,
                ts=rec["ts"],
            )
            self._publish(self.t_dead, doc)
            return
        if rec["is_anomaly"]:
            self._publish(f"{self.t_anomalies}/{device}", dumps(anomaly_event(rec)))
        if self.settings.publish_scores:
            self._publish(f"{self.t_scores}/{device}", dumps(rec))

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.mqtt is not None:
            self.mqtt.publish(topic, payload)

    def _ack(self, msg: InboundMessage) -> None:
        if self.mqtt is not None:
            self.mqtt.ack(msg)

    # ------------------------------------------------------------------ REST door
    def submit_rest(self, work: Work, timeout: float) -> None:
        if not self._intake_open:
            raise QueueFull("service is not accepting readings")
        self.batcher.submit(work, timeout=timeout)

    def health(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "mqtt_connected": None if self.mqtt is None else self.mqtt.connected,
            "model": self.engine.scorer.model_version,
            "queue_depth": self.batcher.depth,
            "devices": len(self.engine.scorer.store),
        }
