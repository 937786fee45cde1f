"""Readings in, results out — columnar, with cheap per-reading records for I/O.

>>> from sensorwatch.scoring.batch import Reading, ReadingBatch
>>> batch = ReadingBatch.from_records(
...     [Reading("a", 1.0, [1.5]), Reading("a", 2.0, {"temp": 2.0}), Reading("b", 1.0, [1.0, 2.0])],
...     channel_names=("temp",),
... )
>>> batch.values.tolist(), batch.reject.tolist()
([[1.5], [2.0], [nan]], [None, None, 'wrong_channel_count'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from itertools import chain
from typing import Any

import numpy as np


class RejectReason(StrEnum):
    """Why a reading could not be scored (its device's state is left untouched)."""

    WRONG_CHANNEL_COUNT = "wrong_channel_count"
    UNKNOWN_CHANNEL = "unknown_channel"
    NON_FINITE = "non_finite"
    VALUE_TOO_LARGE = "value_too_large"
    BAD_VALUE = "bad_value"
    NO_VALUES = "no_values"
    BAD_TIMESTAMP = "bad_timestamp"
    TS_OUT_OF_RANGE = "ts_out_of_range"
    OUT_OF_ORDER = "out_of_order"
    DUPLICATE_TIMESTAMP = "duplicate_timestamp"
    BAD_DEVICE_ID = "bad_device_id"
    CAPACITY = "capacity"


@dataclass(frozen=True)
class Reading:
    """One reading as it arrives: ``values`` as a list (by position) or a mapping (by channel name).

    ``None`` or NaN marks a missing channel; a channel absent from a mapping is missing too.
    ``ts``: unix seconds, a timezone-aware ``datetime`` or an RFC 3339 string.
    """

    device_id: str
    ts: float | str | datetime
    values: Sequence[float | None] | Mapping[str, float | None]


def parse_ts(ts: Any) -> float:
    """Unix seconds from a number, an aware ``datetime`` or an RFC 3339 string (``Z`` allowed).

    >>> parse_ts("1970-01-01T00:01:00Z"), parse_ts(5)
    (60.0, 5.0)
    """
    if isinstance(ts, bool):
        raise ValueError("timestamp must be a number or an RFC 3339 string")
    if isinstance(ts, int | float):
        value = float(ts)
    elif isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError("timestamp needs a timezone")
        value = ts.timestamp()
    elif isinstance(ts, str):
        dt = datetime.fromisoformat(ts.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if dt.tzinfo is None:
            raise ValueError("RFC 3339 timestamp needs a timezone offset")
        value = dt.timestamp()
    else:
        raise ValueError("timestamp must be a number or an RFC 3339 string")
    if not math.isfinite(value):
        raise ValueError("timestamp must be finite")
    return value


@dataclass
class ReadingBatch:
    """Columnar readings: ``values`` (N, C) float64 with NaN for missing channels.

    ``reject`` (N,) object array holds a reason for readings already refused while parsing
    (None for the rest); those readings never touch state.
    """

    device_ids: list[str]
    ts: np.ndarray
    values: np.ndarray
    reject: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    def __post_init__(self) -> None:
        n = len(self.device_ids)
        self.ts = np.asarray(self.ts, dtype=np.float64).reshape(n)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2 or self.values.shape[0] != n:
            raise ValueError(f"values must be (N, C) with N={n}, got {self.values.shape}")
        if self.reject.size == 0:
            self.reject = np.full(n, None, dtype=object)
        elif self.reject.shape != (n,):
            raise ValueError("reject must have one entry per reading")

    def __len__(self) -> int:
        return len(self.device_ids)

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])

    @classmethod
    def from_records(cls, readings: Sequence[Reading], channel_names: Sequence[str]) -> ReadingBatch:
        """Parse heterogeneous readings; malformed ones become rejections with a reason code."""
        return cls.from_columns(
            [r.device_id for r in readings],
            [r.ts for r in readings],
            [r.values for r in readings],
            channel_names,
        )

    @classmethod
    def from_columns(
        cls, device_ids: list[str], ts: Sequence[Any], values: Sequence[Any], channel_names: Sequence[str]
    ) -> ReadingBatch:
        """The columnar form of readings given as three parallel lists (as parsed from JSON):
        the same validation as :meth:`from_records`, with a fast path for the common shape (a list of
        ``C`` plain floats and a numeric timestamp) that builds no per-reading object.

        >>> b = ReadingBatch.from_columns(["a", "a"], [1, "x"], [[1.5], [True]], ("t",))
        >>> b.values.tolist(), b.reject.tolist()
        ([[1.5], [nan]], [None, 'bad_value'])
        """
        n, c = len(device_ids), len(channel_names)
        index = {name: i for i, name in enumerate(channel_names)}
        values_out = np.full((n, c), np.nan)
        ts_out = np.empty(n)
        reject = np.full(n, None, dtype=object)
        for i in range(n):
            v, t = values[i], ts[i]
            if type(v) is list and len(v) == c and all(type(x) is float for x in v):
                values_out[i] = v
                ok_id = type(device_ids[i]) is str and device_ids[i]
                reason = None if ok_id else RejectReason.BAD_DEVICE_ID
            else:
                reason = _parse_values(device_ids[i], v, index, values_out[i])
            if type(t) is float or (type(t) is int and -(2**53) < t < 2**53):
                ts_out[i] = t  # also for rejected readings: their rejection reports it
                if not math.isfinite(t):  # as parse_ts refuses it (NaN: an unreadable reading's slot)
                    ts_out[i] = math.nan
                    reason = reason or RejectReason.BAD_TIMESTAMP
            else:
                try:
                    ts_out[i] = parse_ts(t)
                except (ValueError, TypeError, OverflowError):
                    ts_out[i] = math.nan
                    reason = reason or RejectReason.BAD_TIMESTAMP
            if reason is not None:
                reject[i] = reason.value
        return cls(device_ids, ts_out, values_out, reject)

    @classmethod
    def from_parts(cls, parts: Sequence[Part], channel_names: Sequence[str]) -> ReadingBatch:
        """One batch of readings given in parts, in order. A part is three parallel sequences: lists
        as parsed (validated as :meth:`from_columns` does), or **clean arrays** — ``ts`` (n,) and
        ``values`` (n, k) float64 that :func:`clean_columns` made from readings of the common shape,
        so only their width is left to check (a width other than C: ``wrong_channel_count``, as the
        lists would get).

        >>> ts, vals = np.array([1.0, 2.0]), np.array([[1.5], [2.5]])
        >>> b = ReadingBatch.from_parts([(["a", "a"], ts, vals), (["b"], [3], [[1, 2]])], ("t",))
        >>> b.values.tolist(), b.reject.tolist()
        ([[1.5], [2.5], [nan]], [None, None, 'wrong_channel_count'])
        """
        c = len(channel_names)
        ids = list(chain.from_iterable(p[0] for p in parts))
        if all(type(p[1]) is np.ndarray and p[2].shape[1] == c for p in parts):  # the common case
            if not parts:
                return cls([], np.empty(0), np.empty((0, c)))
            return cls(ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
        n = len(ids)
        ts, values = np.empty(n), np.full((n, c), np.nan)
        reject = np.full(n, None, dtype=object)
        start = 0
        for part_ids, part_ts, part_values in _runs(parts):
            stop = start + len(part_ids)
            if type(part_ts) is np.ndarray:
                ts[start:stop] = part_ts
                if part_values.shape[1] == c:
                    values[start:stop] = part_values
                else:
                    reject[start:stop] = RejectReason.WRONG_CHANNEL_COUNT.value
            else:
                run = cls.from_columns(list(part_ids), part_ts, part_values, channel_names)
                ts[start:stop], values[start:stop], reject[start:stop] = run.ts, run.values, run.reject
            start = stop
        return cls(ids, ts, values, reject)


#: Readings of one door's message or request: device ids, timestamps, values (see ``from_parts``).
Part = tuple[Sequence[str], Any, Any]


def _runs(parts: Sequence[Part]) -> list[Part]:
    """``parts`` with consecutive list parts joined (one :meth:`ReadingBatch.from_columns` each)."""
    out: list[Part] = []
    pending: tuple[list[Any], list[Any], list[Any]] | None = None
    for p in parts:
        if type(p[1]) is np.ndarray:
            if pending is not None:
                out.append(pending)
                pending = None
            out.append(p)
            continue
        if pending is None:
            pending = ([], [], [])
        pending[0].extend(p[0])
        pending[1].extend(p[1])
        pending[2].extend(p[2])
    if pending is not None:
        out.append(pending)
    return out


#: Timestamps at or beyond 2**53 in magnitude are left to the per-reading path (an integer there
#: would not be exact as a float).
_TS_LIMIT = 2.0**53
#: Integer values at or beyond this are left to the per-reading path (``value_too_large`` there).
_VALUE_LIMIT = 1.7e308


def clean_columns(ts: list[Any], values: list[Any]) -> tuple[list[Any], list[Any], int] | None:
    """``(ts, flat values, width)`` when every reading has the common shape — a finite numeric
    timestamp below 2**53 and a list of the same number of numbers (NaN allowed, no None, no bool) —
    else None. What this accepts, :meth:`ReadingBatch.from_columns` accepts with the same numbers,
    so the intake can send such readings as arrays (``np.array(ts)``, ``np.array(flat).reshape(n,
    width)``) and skip the per-reading checks; anything else goes the per-reading way. Every check
    runs in C (``map``, ``set``, ``min``/``max``/``sum``).

    >>> clean_columns([1, 2.5], [[1.0, 2], [3.0, 4.0]])
    ([1, 2.5], [1.0, 2, 3.0, 4.0], 2)
    >>> clean_columns([1, True], [[1.0], [2.0]]), clean_columns([1], [[None]]), clean_columns([1], [{"a": 1}])
    (None, None, None)
    """
    if not ts or not set(map(type, ts)) <= _NUMBERS:
        return None
    # Bounds first (an int compares exactly with a float, whatever its size); then a NaN the bounds
    # let through makes the sum NaN, and ``total - total`` is not 0.
    if not (min(ts) > -_TS_LIMIT and max(ts) < _TS_LIMIT):
        return None
    total = sum(ts)
    if total - total != 0:
        return None
    if set(map(type, values)) != _LIST:
        return None
    width = len(values[0])
    if set(map(len, values)) != {width}:
        return None
    flat = list(chain.from_iterable(values))
    kinds = set(map(type, flat))
    if not kinds <= _NUMBERS:
        return None
    if int in kinds and not (min(flat) > -_VALUE_LIMIT and max(flat) < _VALUE_LIMIT):
        return None  # an integer beyond float range: the per-reading path says value_too_large
    return ts, flat, width


_NUMBERS = frozenset((float, int))
_LIST = {list}


def _parse_values(
    device_id: Any, vals: Any, index: Mapping[str, int], out: np.ndarray
) -> RejectReason | None:
    if not isinstance(device_id, str) or not device_id:
        return RejectReason.BAD_DEVICE_ID
    if isinstance(vals, Mapping):
        unknown = [k for k in vals if k not in index]
        if unknown:
            return RejectReason.UNKNOWN_CHANNEL
        items: list[tuple[int, Any]] = [(index[k], v) for k, v in vals.items()]
    elif isinstance(vals, Sequence) and not isinstance(vals, str | bytes):
        if len(vals) != len(index):
            return RejectReason.WRONG_CHANNEL_COUNT
        items = list(enumerate(vals))
    else:
        return RejectReason.BAD_VALUE
    for i, v in items:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            return RejectReason.BAD_VALUE
        try:
            out[i] = float(v)
        except OverflowError:  # an integer beyond float range (hundreds of digits)
            return RejectReason.VALUE_TOO_LARGE
    return None


#: Names of the anomaly kinds (``StepResult.kind`` codes; ``components.decision`` says what each is).
KINDS = (None, "pattern", "contextual", "spike", "stuck", "out_of_range")
#: Severity names by code (``components.decision.severity_of``; 0: not an anomaly).
SEVERITIES = (None, "low", "medium", "high", "critical")

#: Per-reading result columns (besides device_id, ts, accepted, reason and model_version).
RESULT_COLUMNS = (
    "predicted",
    "z",
    "raw_score",
    "smoothed_score",
    "threshold",
    "likelihood",
    "is_anomaly",
    "attribution",
    "warming_up",
    "gap_reset",
    "imputed",
)


@dataclass
class StepResult:
    """One entry per input reading, in input order. Rejected readings have ``accepted`` False, a
    ``reason`` and NaN/False in the numeric columns."""

    device_ids: list[str]
    ts: np.ndarray
    accepted: np.ndarray
    reason: np.ndarray
    predicted: np.ndarray
    z: np.ndarray
    raw_score: np.ndarray
    smoothed_score: np.ndarray
    threshold: np.ndarray
    likelihood: np.ndarray
    is_anomaly: np.ndarray
    attribution: np.ndarray
    warming_up: np.ndarray
    gap_reset: np.ndarray
    imputed: np.ndarray
    kind: np.ndarray
    """(N,) int8: which check made an anomaly (an index into :data:`KINDS`; 0 for other readings)."""
    value: np.ndarray
    """(N, C): the reading's values as scored (NaN: missing)."""
    continues: np.ndarray
    """(N,) bool: an anomaly continuing its device's stuck or out-of-range episode (no new event)."""
    ended: np.ndarray
    """(N,) int8: the kind of the device's episode that ended just before this reading (0: none)."""
    severity: np.ndarray
    """(N,) int8: how urgent an anomaly is (an index into :data:`SEVERITIES`; 0 for other readings)."""
    model_version: str
    channel_names: tuple[str, ...]
    _notable: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def notable(self) -> np.ndarray:
        """(N,) bool: what is published when scores are not — rejections, anomalies, episode ends."""
        return ~self.accepted | self.is_anomaly | (self.ended > 0)

    @property
    def starts_event(self) -> np.ndarray:
        """(N,) bool: anomalies that are an event of their own (not continuing an episode)."""
        return self.is_anomaly & ~self.continues

    def notable_between(self, start: int, stop: int) -> bool:
        """Whether any reading in ``start:stop`` is :attr:`notable`: answered in O(1) from one
        cumulative count per result."""
        if self._notable is None:
            self._notable = [0, *np.cumsum(self.notable).tolist()]
        return self._notable[stop] > self._notable[start]

    @classmethod
    def empty(
        cls, batch: ReadingBatch, channels: int, model_version: str, channel_names: tuple[str, ...]
    ) -> StepResult:
        n = len(batch)
        nan1, nanc = np.full(n, np.nan), np.full((n, channels), np.nan)
        f1, fc = np.zeros(n, dtype=bool), np.zeros((n, channels), dtype=bool)
        return cls(
            device_ids=list(batch.device_ids),
            ts=batch.ts.copy(),
            accepted=f1.copy(),
            reason=batch.reject.copy(),
            predicted=nanc.copy(),
            z=nanc.copy(),
            raw_score=nan1.copy(),
            smoothed_score=nan1.copy(),
            threshold=nan1.copy(),
            likelihood=nan1.copy(),
            is_anomaly=f1.copy(),
            attribution=nanc.copy(),
            warming_up=f1.copy(),
            gap_reset=f1.copy(),
            imputed=fc.copy(),
            kind=np.zeros(n, dtype=np.int8),
            continues=f1.copy(),
            ended=np.zeros(n, dtype=np.int8),
            severity=np.zeros(n, dtype=np.int8),
            value=batch.values.copy() if batch.values.shape[1] == channels else nanc.copy(),
            model_version=model_version,
            channel_names=channel_names,
        )

    def __len__(self) -> int:
        return len(self.device_ids)

    def record(self, i: int) -> dict[str, Any]:
        """Reading ``i`` as a JSON-ready dict (rejections: device_id, ts, accepted, reason)."""
        base: dict[str, Any] = {"device_id": self.device_ids[i], "ts": _finite_or_none(self.ts[i])}
        if not self.accepted[i]:
            return {**base, "accepted": False, "reason": self.reason[i]}
        names = self.channel_names
        return {
            **base,
            "accepted": True,
            "predicted": _channel_dict(names, self.predicted[i]),
            "z": _channel_dict(names, self.z[i]),
            "raw_score": float(self.raw_score[i]),
            "smoothed_score": float(self.smoothed_score[i]),
            "threshold": _finite_or_none(self.threshold[i]),
            "likelihood": float(self.likelihood[i]),
            "is_anomaly": bool(self.is_anomaly[i]),
            "kind": KINDS[self.kind[i]] if self.is_anomaly[i] else None,
            "severity": SEVERITIES[self.severity[i]] if self.is_anomaly[i] else None,
            "continues": bool(self.continues[i]),
            "episode_ended": KINDS[self.ended[i]],
            "value": _channel_dict(names, self.value[i]),
            "attribution": _channel_dict(names, self.attribution[i]),
            "warming_up": bool(self.warming_up[i]),
            "gap_reset": bool(self.gap_reset[i]),
            "imputed": [n for n, m in zip(names, self.imputed[i], strict=True) if m],
            "model_version": self.model_version,
        }

    def records(self, rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """:meth:`record` of each of ``rows`` (default: all), equal to it field for field, built from
        whole columns: one ``tolist`` per column instead of numpy scalar reads per field. A
        10,000-reading REST answer took 0.26 s of the GIL reading by row, which stalled every other
        caller (tests/engine/test_rejections.py checks the two agree)."""
        idx = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        names = self.channel_names
        acc = self.accepted[idx].tolist()
        ts = [x if math.isfinite(x) else None for x in self.ts[idx].tolist()]
        dev = [self.device_ids[i] for i in idx.tolist()]
        reason = self.reason[idx].tolist()
        ok = self.accepted[idx]

        # Channel columns: NaN/inf as None, as _channel_dict does.
        def channels(a: np.ndarray) -> list[dict[str, float | None]]:
            sub = a[idx]
            fin = np.isfinite(sub).tolist()
            return [
                {n: (v if f else None) for n, v, f in zip(names, row, frow, strict=True)}
                for row, frow in zip(sub.tolist(), fin, strict=True)
            ]

        def finite(a: np.ndarray) -> list[float | None]:
            return [x if math.isfinite(x) else None for x in a[idx].tolist()]

        anomaly = (self.is_anomaly[idx] & ok).tolist()
        kind = [KINDS[k] if a else None for k, a in zip(self.kind[idx].tolist(), anomaly, strict=True)]
        sev = [
            SEVERITIES[k] if a else None for k, a in zip(self.severity[idx].tolist(), anomaly, strict=True)
        ]
        cols = {
            "predicted": channels(self.predicted),
            "z": channels(self.z),
            "raw_score": self.raw_score[idx].tolist(),
            "smoothed_score": self.smoothed_score[idx].tolist(),
            "threshold": finite(self.threshold),
            "likelihood": self.likelihood[idx].tolist(),
            "is_anomaly": self.is_anomaly[idx].tolist(),
            "kind": kind,
            "severity": sev,
            "continues": self.continues[idx].tolist(),
            "episode_ended": [KINDS[k] for k in self.ended[idx].tolist()],
            "value": channels(self.value),
            "attribution": channels(self.attribution),
            "warming_up": self.warming_up[idx].tolist(),
            "gap_reset": self.gap_reset[idx].tolist(),
            "imputed": [
                [n for n, m in zip(names, row, strict=True) if m] for row in self.imputed[idx].tolist()
            ],
        }
        keys = list(cols)
        columns = [cols[k] for k in keys]
        version = self.model_version
        out: list[dict[str, Any]] = []
        for j, a in enumerate(acc):
            if not a:
                out.append({"device_id": dev[j], "ts": ts[j], "accepted": False, "reason": reason[j]})
                continue
            rec: dict[str, Any] = {"device_id": dev[j], "ts": ts[j], "accepted": True}
            for k, col in zip(keys, columns, strict=True):
                rec[k] = col[j]
            rec["model_version"] = version
            out.append(rec)
        return out

    def anomalies(self) -> np.ndarray:
        """Indices of readings flagged as anomalies."""
        return np.flatnonzero(self.is_anomaly)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _channel_dict(names: Sequence[str], row: np.ndarray) -> dict[str, float | None]:
    return {n: _finite_or_none(v) for n, v in zip(names, row.tolist(), strict=True)}
