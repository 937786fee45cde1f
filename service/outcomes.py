"""What one scored (or refused) message publishes: dead letters, anomaly events, episode ends and —
with ``PUBLISH_SCORES`` — every result. Shared by the single-node service (MQTT) and the cluster
worker (NATS subjects): both hand it a ``publish(topic, payload, key)`` of their own, where ``key`` is
the outcome's ``event_id`` (the cluster dedupes re-published outcomes by it)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sensorwatch.scoring.batch import StepResult
from sensorwatch.state.records import MessageMeta
from service.payloads import (
    anomaly_event,
    deadletter,
    dumps,
    episode_end_event,
    event_id,
    records_to_publish,
    rejection_id,
)
from service.settings import Settings

log = logging.getLogger("sensorwatch.service")

#: ``publish(topic, payload, key)``: ``key`` names the outcome (its ``event_id``, prefixed by its kind).
Publish = Callable[[str, bytes, str], None]


class Outcomes:
    """Turns a message's results into the documents it publishes (see module docstring)."""

    def __init__(self, settings: Settings, publish: Publish) -> None:
        self.settings = settings
        self._publish = publish
        p = settings.topic_prefix
        self.t_anomalies, self.t_scores, self.t_dead = f"{p}/anomalies", f"{p}/scores", f"{p}/deadletter"

    def dead_letter(self, meta: MessageMeta, payload: bytes, device: str | None, *, replayed: bool) -> None:
        """A message refused whole (``meta.reason``)."""
        key = rejection_id(meta.digest, None)
        extra: dict[str, Any] = {"event_id": key}
        if device is not None:
            extra["device_id"] = device
        if replayed:
            extra["replayed"] = True
        reason, detail = meta.reason or "internal_error", meta.detail or ""
        self._publish(self.t_dead, deadletter(reason, detail, meta.topic, payload, **extra), f"dead:{key}")

    def publish(
        self,
        meta: MessageMeta,
        payload: bytes,
        result: StepResult | None,
        start: int,
        stop: int,
        *,
        replayed: bool,
    ) -> None:
        """Outcomes of readings ``start:stop`` of ``result`` (one message's); ``None``: the step failed."""
        if result is None:
            failed = MessageMeta(meta.source, meta.topic, meta.digest, 0, "internal_error", "scoring failed")
            self.dead_letter(failed, payload, None, replayed=replayed)
            return
        for rec in records_to_publish(result, start, stop, every=self.settings.publish_scores):
            index = rec["index"]
            try:
                self._record(meta, payload, rec, replayed)
            except (ValueError, TypeError) as exc:  # e.g. a NaN that strict JSON refuses
                log.exception("result of reading %d of %s not publishable", index, meta.topic)
                key = rejection_id(meta.digest, index)
                doc = deadletter(
                    "internal_error",
                    f"result not publishable: {exc}",
                    meta.topic,
                    payload,
                    device_id=rec["device_id"],
                    index=index,
                    event_id=key,
                )
                self._publish(self.t_dead, doc, f"dead:{key}")

    def _record(self, meta: MessageMeta, payload: bytes, rec: dict[str, Any], replayed: bool) -> None:
        device, index = rec["device_id"], rec.pop("index")
        if not rec["accepted"]:
            key = rejection_id(meta.digest, index)
            extra: dict[str, Any] = {"replayed": True} if replayed else {}
            doc = deadletter(
                rec["reason"],
                rec["detail"],
                meta.topic,
                payload,
                device_id=device,
                index=index,
                ts=rec["ts"],
                event_id=key,
                **extra,
            )
            self._publish(self.t_dead, doc, f"dead:{key}")
            return
        rec["event_id"] = key = event_id(device, rec["ts"], rec["model_version"])
        if replayed:
            rec["replayed"] = True
        if rec["episode_ended"]:  # before this reading's own event: the old episode ended first
            end = episode_end_event(rec)
            self._publish(f"{self.t_anomalies}/{device}", dumps(end), f"end:{end['event_id']}")
        if rec["is_anomaly"] and not rec["continues"]:  # one event per stuck / out-of-range episode
            self._publish(f"{self.t_anomalies}/{device}", dumps(anomaly_event(rec)), f"anomaly:{key}")
        if self.settings.publish_scores:
            self._publish(f"{self.t_scores}/{device}", dumps(rec), f"score:{key}")
