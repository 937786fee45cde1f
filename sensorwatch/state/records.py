"""The write-ahead log's record kinds and their encoding (the framing is :mod:`.wal`'s).

* :class:`BatchRecord` — one micro-batch exactly as it was fed to ``StreamScorer.step``: the columnar
  readings (device ids, timestamps, values with NaN for missing channels, parse-time rejections), the
  clock value the state store used for idle TTL (so a replay folds the same), and per message its
  source, topic, a digest of topic + payload and its number of readings (a message refused whole has
  0 readings and its reason);
* :class:`ResetRecord` — a device forgotten (``DELETE /v1/devices/{id}``);
* :class:`ReloadRecord` — a model swapped in (its reference and weights' sha256);
* :class:`DoneRecord` — outputs published and messages acked for every record up to ``through``
  (written lazily, never synced on its own: after a crash the outputs of later records are published
  again, marked ``replayed``).

A batch payload is ``b"B"`` + a u32 length + a JSON header + the timestamps (float64) + the values
(float64, row-major) + per message its reading count (u32) and digest (16 bytes); the others are
``b"J"`` + JSON.

>>> import numpy as np
>>> from sensorwatch.scoring.batch import ReadingBatch
>>> b = ReadingBatch(["a", "b"], [1.0, 2.0], [[0.5], [np.nan]])
>>> msgs = [MessageMeta("mqtt", "s/a/r", b"\\x01" * 16, 1), MessageMeta("rest", "", b"", 1)]
>>> rec = BatchRecord(12.5, b, msgs)
>>> back = decode(encode(rec))
>>> back.clock, back.batch.device_ids, back.batch.values.tolist(), back.messages[0].digest == b"\\x01" * 16
(12.5, ['a', 'b'], [[0.5], [nan]], True)
>>> decode(encode(ResetRecord("pump-7")))
ResetRecord(device_id='pump-7')
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson

from sensorwatch.scoring.batch import ReadingBatch


class MessageMeta(NamedTuple):
    """One message (or REST request) of a batch: where it came from and how many readings it holds."""

    source: str
    topic: str
    digest: bytes
    readings: int
    reason: str | None = None  # a message refused whole (0 readings): its reason and detail
    detail: str | None = None


@dataclass(frozen=True)
class BatchRecord:
    clock: float
    batch: ReadingBatch
    messages: list[MessageMeta]


@dataclass(frozen=True)
class ResetRecord:
    device_id: str


@dataclass(frozen=True)
class ReloadRecord:
    ref: str
    sha256: str | None


@dataclass(frozen=True)
class DoneRecord:
    through: int


Record = BatchRecord | ResetRecord | ReloadRecord | DoneRecord
_U32 = struct.Struct("<I")
DIGEST_BYTES = 16


def encode(rec: Record) -> bytes:
    if isinstance(rec, BatchRecord):
        return _encode_batch(rec)
    if isinstance(rec, ResetRecord):
        doc: dict[str, object] = {"kind": "reset", "device_id": rec.device_id}
    elif isinstance(rec, ReloadRecord):
        doc = {"kind": "reload", "ref": rec.ref, "sha256": rec.sha256}
    else:
        doc = {"kind": "done", "through": rec.through}
    return b"J" + orjson.dumps(doc)


def _encode_batch(rec: BatchRecord) -> bytes:
    """Header JSON (ids, topics, sparse rejections and refusals), then binary columns: timestamps,
    values, per message its reading count (u32) and digest (16 bytes; empty for REST)."""
    b, msgs = rec.batch, rec.messages
    # One transpose of the message tuples instead of a Python pass per column.
    src, topics, digest, readings, reasons, details = zip(*msgs, strict=True) if msgs else ((),) * 6
    rejected = np.flatnonzero(b.reject != None).tolist()  # noqa: E711 - elementwise, not identity
    header = orjson.dumps(
        {
            "clock": rec.clock,
            "n": len(b),
            "c": b.channels,
            "ids": b.device_ids,
            "reject": [[i, b.reject[i]] for i in rejected],
            "src": src,
            "topics": topics,
            "refused": [[i, r, details[i]] for i, r in enumerate(reasons) if r is not None]
            if any(reasons)
            else [],
        }
    )
    ts = np.ascontiguousarray(b.ts, dtype="<f8").tobytes()
    values = np.ascontiguousarray(b.values, dtype="<f8").tobytes()
    counts = np.array(readings, dtype="<u4").tobytes()
    digests = b"".join(digest)
    if len(digests) != DIGEST_BYTES * len(msgs):  # some without a digest (REST): pad each
        digests = b"".join(d.ljust(DIGEST_BYTES, b"\0") for d in digest)
    return b"".join((b"B", _U32.pack(len(header)), header, ts, values, counts, digests))


def decode(payload: bytes | memoryview) -> Record:
    data = memoryview(payload)
    kind = bytes(data[:1])
    if kind == b"B":
        return _decode_batch(data)
    if kind != b"J":
        raise ValueError(f"unknown write-ahead record kind {kind!r}")
    doc = orjson.loads(data[1:])
    if doc["kind"] == "reset":
        return ResetRecord(doc["device_id"])
    if doc["kind"] == "reload":
        return ReloadRecord(doc["ref"], doc["sha256"])
    if doc["kind"] == "done":
        return DoneRecord(int(doc["through"]))
    raise ValueError(f"unknown write-ahead record kind {doc['kind']!r}")


def _decode_batch(data: memoryview) -> BatchRecord:
    (hlen,) = _U32.unpack_from(data, 1)
    head = orjson.loads(data[5 : 5 + hlen])
    n, c = int(head["n"]), int(head["c"])
    off = 5 + hlen
    ts = np.frombuffer(data, dtype="<f8", count=n, offset=off).astype(np.float64)
    values = np.frombuffer(data, dtype="<f8", count=n * c, offset=off + 8 * n).astype(np.float64)
    reject = np.full(n, None, dtype=object)
    for i, r in head["reject"]:
        reject[i] = r
    batch = ReadingBatch(list(head["ids"]), ts, values.reshape(n, c), reject)
    m = len(head["src"])
    off += 8 * n + 8 * n * c
    counts = np.frombuffer(data, dtype="<u4", count=m, offset=off).tolist()
    blob = bytes(data[off + 4 * m : off + 4 * m + DIGEST_BYTES * m])
    refused = {i: (r, d) for i, r, d in head["refused"]}
    msgs = []
    for i, (src, topic) in enumerate(zip(head["src"], head["topics"], strict=True)):
        digest = blob[DIGEST_BYTES * i : DIGEST_BYTES * (i + 1)]
        reason, detail = refused.get(i, (None, None))
        msgs.append(MessageMeta(src, topic, digest if any(digest) else b"", counts[i], reason, detail))
    return BatchRecord(float(head["clock"]), batch, msgs)
