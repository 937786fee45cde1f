"""Wire formats shared by every door: device ids, reading payloads, dead-letter and result messages.

Input payload (JSON) for one device: ``{"ts": <unix s | RFC 3339>, "values": [..] | {"ch": v}}`` or a
gateway batch ``{"readings": [{...}, ...]}``. A payload that cannot be read at all is one
message-level rejection (:class:`PayloadError`); a malformed *reading* inside a readable payload
becomes a per-reading rejection from the engine, the rest of the payload is scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import numpy as np
import orjson

from sensorwatch.scoring.batch import StepResult

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


class TopicMatcher:
    """The device id at the pattern's ``+`` position (None when the topic does not match), for one
    pattern, without splitting every topic.

    >>> TopicMatcher("sensors/+/readings")("sensors/pump-7/readings"), TopicMatcher("a/+")("a/b/c")
    ('pump-7', None)
    """

    def __init__(self, pattern: str) -> None:
        head, _, tail = pattern.partition("+")
        self.head, self.tail, self.pattern = head, tail, pattern

    def __call__(self, topic: str) -> str | None:
        h, t = self.head, self.tail
        if len(topic) < len(h) + len(t) or not topic.startswith(h) or not topic.endswith(t):
            return None
        device = topic[len(h) : len(topic) - len(t)]
        return None if "/" in device else device


def parse_message(
    payload: bytes, device_id: str, *, max_bytes: int, max_readings: int
) -> tuple[list[Any], list[Any]]:
    """Timestamps and values of one MQTT message's readings, as parsed (validated per reading by the
    engine); raises :class:`PayloadError` for an unusable message. orjson refuses nesting deeper than
    1,024 and numbers beyond float range with a ``JSONDecodeError`` like any malformed JSON.

    >>> parse_message(b'{"readings": [{"ts": 1, "values": [2.5]}, 7]}', "d", max_bytes=99, max_readings=9)
    ([1, nan], [[2.5], None])
    """
    if len(payload) > max_bytes:
        raise PayloadError("payload_too_large", f"{len(payload)} bytes > {max_bytes}")
    if not valid_device_id(device_id):
        raise PayloadError("bad_device_id", f"invalid device id {device_id[:64]!r} in topic")
    doc = loads_payload(payload)
    if type(doc) is not dict:
        raise PayloadError("bad_payload", "payload must be a JSON object")
    if "readings" not in doc:
        return [doc.get("ts", math.nan)], [doc.get("values")]
    items = doc["readings"]
    if type(items) is not list or not items:
        raise PayloadError("bad_payload", "'readings' must be a non-empty list")
    if len(items) > max_readings:
        raise PayloadError("too_many_readings", f"{len(items)} readings > {max_readings}")
    # A reading that is not an object keeps its slot (NaN, None): the engine rejects it as bad_value.
    ts = [it.get("ts", math.nan) if type(it) is dict else math.nan for it in items]
    values = [it.get("values") if type(it) is dict else None for it in items]
    return ts, values


def loads_payload(payload: bytes) -> Any:
    """JSON as the intake reads it (orjson; NaN/Infinity tokens accepted); :class:`PayloadError`
    with malformed_json, too_deep or number_out_of_range otherwise."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        if not _NON_FINITE.search(payload):
            raise _refusal(exc) from None
        error: Exception = exc
    # NaN / Infinity tokens are not JSON, but Python's json.dumps writes them by default and devices
    # send them for a missing or broken channel: the standard library reads them (the engine then
    # rejects or imputes the value). Only such payloads take this slower path, errors caught alike.
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        error = exc
    raise _refusal(error) from None


_NON_FINITE = re.compile(rb"NaN|Infinity")
#: What the parsers say for nesting beyond their limit (orjson: 1,024; Python: the recursion limit)
#: and for a number no float holds (orjson: beyond ±1.8e308; Python: over 4,300 digits).
_TOO_DEEP = ("depth limit exceeded", "maximum recursion depth")
_TOO_BIG = ("number is infinity", "integer string conversion")


def _refusal(exc: Exception) -> PayloadError:
    """The rejection of a payload the parsers refused: too_deep, number_out_of_range, else
    malformed_json (one vocabulary for metrics, dead letters and REST)."""
    text = str(exc)
    if isinstance(exc, RecursionError) or any(t in text for t in _TOO_DEEP):
        return PayloadError("too_deep", f"nested deeper than the parser allows: {text[:120]}")
    if any(t in text for t in _TOO_BIG):
        return PayloadError("number_out_of_range", f"a number beyond float range: {text[:120]}")
    return PayloadError("malformed_json", f"not JSON: {text[:200]}")


def message_digest(topic: str, payload: bytes) -> bytes:
    """16 bytes identifying a message by topic and payload (a redelivery has the same digest). The
    whole topic counts, length-prefixed: it was once the blake2b key, which holds 64 bytes, so two
    devices with long ids sharing a 64-byte topic prefix and sending the same payload got the same
    digest — after a restart the second was taken for a redelivery and acked unscored (found by
    tests/e2e/test_fuzz_mqtt.py)."""
    t = topic.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(len(t).to_bytes(4, "big"), digest_size=16)
    h.update(t)
    h.update(payload)
    return h.digest()


def event_id(device_id: str, ts: float, model_version: str) -> str:
    """The same id for the same reading scored by the same model, whatever happened in between
    (consumers dedupe re-published results by it).

    >>> event_id("pump-7", 1767225600.0, "univariate/2") == event_id("pump-7", 1767225600.0, "univariate/2")
    True
    """
    key = f"{device_id}\x00{ts!r}\x00{model_version}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


def rejection_id(digest: bytes, index: int | None) -> str:
    """Id of a dead letter: the message's digest and the reading's index in it."""
    tail = b"" if index is None else index.to_bytes(4, "little")
    return hashlib.blake2b(digest + tail, digest_size=12).hexdigest()


def episode_end_event(record: dict[str, Any]) -> dict[str, Any]:
    """The payload of ``PREFIX/anomalies/ID`` when a stuck or out-of-range episode ends (at the first
    reading after it): its kind, ``episode: "end"``, the reading that ended it and an ``event_id``
    of its own."""
    device, ts, version = record["device_id"], record["ts"], record["model_version"]
    doc = {
        "device_id": device,
        "ts": ts,
        "kind": record["episode_ended"],
        "episode": "end",
        "value": record["value"],
        "model_version": version,
        "event_id": event_id(device, ts, f"{version}#end"),
    }
    if record.get("replayed"):
        doc["replayed"] = True
    return doc


def anomaly_event(record: dict[str, Any]) -> dict[str, Any]:
    """The payload of ``PREFIX/anomalies/ID``."""
    keys = (
        "device_id",
        "ts",
        "kind",
        "severity",
        "value",
        "raw_score",
        "smoothed_score",
        "likelihood",
        "threshold",
        "attribution",
        "predicted",
        "z",
        "model_version",
        "event_id",
        "replayed",
    )
    return {k: record[k] for k in keys if k in record}


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
    return orjson.dumps(doc, default=str)


REASON_DETAILS = {
    "wrong_channel_count": "values has the wrong number of channels",
    "unknown_channel": "values names a channel the model does not have",
    "non_finite": "a value is infinite",
    "value_too_large": "a value's magnitude exceeds max_abs_value",
    "bad_value": "values missing or not numbers",
    "no_values": "every channel is missing",
    "bad_timestamp": "ts missing or not unix seconds / RFC 3339 with offset",
    "ts_out_of_range": "ts is further ahead of the service's clock than max_future_s",
    "out_of_order": "ts is before the device's last reading",
    "duplicate_timestamp": "ts repeats a reading already scored",
    "bad_device_id": "invalid device id",
    "capacity": "more distinct devices in one batch than max_devices",
}


def result_records(result: StepResult, start: int, stop: int) -> list[dict[str, Any]]:
    """Records of readings ``start:stop`` (REST): a human detail for rejections, an ``event_id`` for
    results (the same the reading's MQTT score and event carry)."""
    out = result.records(range(start, stop))
    for rec in out:
        if rec["accepted"]:
            rec["event_id"] = event_id(rec["device_id"], rec["ts"], rec["model_version"])
        else:
            rec["detail"] = REASON_DETAILS.get(rec["reason"], rec["reason"])
    return out


def dumps(doc: Any) -> bytes:
    """Strict JSON (no NaN/Infinity tokens) as bytes."""
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


def records_to_publish(result: StepResult, start: int, stop: int, *, every: bool) -> list[dict[str, Any]]:
    """Records of readings ``start:stop`` that are published: rejections, anomalies and episode ends,
    or every one when ``every`` (scores on). Builds no record for a reading that is not published."""
    if every:
        rows = list(range(start, stop))
    elif not result.notable_between(start, stop):
        return []
    else:
        rows = (np.flatnonzero(result.notable[start:stop]) + start).tolist()
    out = result.records(rows)
    for i, rec in zip(rows, out, strict=True):
        if not rec["accepted"]:
            rec["detail"] = REASON_DETAILS.get(rec["reason"], rec["reason"])
        rec["index"] = i - start
    return out
