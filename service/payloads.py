"""Wire formats shared by every door: device ids, reading payloads, dead-letter and result messages.

Input payload (JSON) for one device: ``{"ts": <unix s | RFC 3339>, "values": [..] | {"ch": v}}`` or a
gateway batch ``{"readings": [{...}, ...]}``. A payload that cannot be read at all is one
message-level rejection (:class:`PayloadError`); a malformed *reading* inside a readable payload
becomes a per-reading rejection from the engine, the rest of the payload is scored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from sensorwatch.scoring.batch import Reading, StepResult

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
DEADLETTER_PAYLOAD_CHARS = 1024


class PayloadError(ValueError):
    """A whole message/request is unusable; ``reason`` is the metric/dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def valid_device_id(device_id: str) -> bool:
    """>>> valid_device_id("pump-7"), valid_device_id("a/b"), valid_device_id("")
    (True, False, False)
    """
    return bool(DEVICE_ID.match(device_id))


def device_from_topic(pattern: str, topic: str) -> str | None:
    """The device id at the pattern's ``+`` position, or None when the topic does not match.

    >>> device_from_topic("sensors/+/readings", "sensors/pump-7/readings")
    'pump-7'
    """
    p, t = pattern.split("/"), topic.split("/")
    if len(p) != len(t):
        return None
    device = None
    for ps, ts in zip(p, t, strict=True):
        if ps == "+":
            device = ts
        elif ps != ts:
            return None
    return device


def parse_readings(payload: bytes, device_id: str, *, max_bytes: int, max_readings: int) -> list[Reading]:
    """Readings of one MQTT message (raises :class:`PayloadError` for an unusable message)."""
    if len(payload) > max_bytes:
        raise PayloadError("payload_too_large", f"{len(payload)} bytes > {max_bytes}")
    if not valid_device_id(device_id):
        raise PayloadError("bad_device_id", f"invalid device id {device_id[:64]!r} in topic")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError("malformed_json", f"not JSON: {exc}") from None
    return readings_from_doc(doc, device_id, max_readings=max_readings)


def readings_from_doc(doc: Any, device_id: str, *, max_readings: int) -> list[Reading]:
    if not isinstance(doc, dict):
        raise PayloadError("bad_payload", "payload must be a JSON object")
    if "readings" in doc:
        items = doc["readings"]
        if not isinstance(items, list) or not items:
            raise PayloadError("bad_payload", "'readings' must be a non-empty list")
    else:
        items = [doc]
    if len(items) > max_readings:
        raise PayloadError("too_many_readings", f"{len(items)} readings > {max_readings}")
    return [_reading(device_id, item) for item in items]


def _reading(device_id: str, item: Any) -> Reading:
    if not isinstance(item, dict):
        # The engine rejects a reading without values as bad_value; keep its slot so it is counted.
        return Reading(device_id, math.nan, None)  # type: ignore[arg-type]
    values: Any = item.get("values")  # validated by the engine: wrong shapes become rejections
    return Reading(device_id, item.get("ts", math.nan), values)


def anomaly_event(record: dict[str, Any]) -> dict[str, Any]:
    """The payload of ``PREFIX/anomalies/ID``."""
    keys = (
        "device_id",
        "ts",
        "raw_score",
        "smoothed_score",
        "likelihood",
        "threshold",
        "attribution",
        "predicted",
        "z",
        "model_version",
    )
    return {k: record[k] for k in keys}


def deadletter(reason: str, detail: str, topic: str, payload: bytes, **extra: Any) -> bytes:
    """The payload of ``PREFIX/deadletter``: reason, detail, source topic and the payload (truncated)."""
    text = payload[: DEADLETTER_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")
    doc = {
        "reason": reason,
        "detail": detail,
        "topic": topic,
        "payload": text[:DEADLETTER_PAYLOAD_CHARS],
        "truncated": len(text) > DEADLETTER_PAYLOAD_CHARS or len(payload) > DEADLETTER_PAYLOAD_CHARS * 4,
        **extra,
    }
    return json.dumps(doc, allow_nan=False, default=str).encode()


REASON_DETAILS = {
    "wrong_channel_count": "values has the wrong number of channels",
    "unknown_channel": "values names a channel the model does not have",
    "non_finite": "a value is infinite",
    "value_too_large": "a value's magnitude exceeds max_abs_value",
    "bad_value": "values missing or not numbers",
    "no_values": "every channel is missing",
    "bad_timestamp": "ts missing or not unix seconds / RFC 3339 with offset",
    "out_of_order": "ts is before the device's last reading",
    "duplicate_timestamp": "ts repeats a reading already scored",
    "bad_device_id": "invalid device id",
    "capacity": "more distinct devices in one batch than max_devices",
}


def result_records(result: StepResult, start: int, stop: int) -> list[dict[str, Any]]:
    """Records of readings ``start:stop`` with a human detail for rejections."""
    out = []
    for i in range(start, stop):
        rec = result.record(i)
        if not rec["accepted"]:
            rec["detail"] = REASON_DETAILS.get(rec["reason"], rec["reason"])
        out.append(rec)
    return out


def dumps(doc: Any) -> bytes:
    """Strict JSON (no NaN/Infinity tokens) as bytes."""
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
