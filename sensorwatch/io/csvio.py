"""CSV readings (``timestamp`` + one column per channel) in, readings + result columns out.

Timestamps may be unix seconds, RFC 3339 or NAB's ``YYYY-MM-DD HH:MM:SS`` (naive times are UTC).
Empty cells are missing values.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from sensorwatch.scoring.batch import KINDS, SEVERITIES, StepResult


def parse_csv_ts(s: str) -> float:
    """Unix seconds from a CSV cell; NaN when unparseable (the reading is then rejected).

    >>> parse_csv_ts("1970-01-01 00:00:10"), parse_csv_ts("12.5")
    (10.0, 12.5)
    """
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return math.nan
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _num(s: str) -> float:
    s = s.strip()
    if not s:
        return math.nan
    try:
        return float(s)
    except ValueError:
        return math.inf  # not a number: rejected downstream as non-finite rather than silently missing


def read_csv_chunks(
    fh: TextIO, chunk: int = 4096
) -> Iterator[tuple[list[str], list[list[str]], np.ndarray, np.ndarray]]:
    """Yield ``(header, raw_rows, ts, values)`` chunks; the first column must be ``timestamp``."""
    reader = csv.reader(fh)
    header = next(reader, None)
    if not header or header[0].strip().lower() != "timestamp" or len(header) < 2:
        raise ValueError("CSV must start with a header 'timestamp,<channel>[,<channel>...]'")
    rows: list[list[str]] = []
    for row in reader:
        if not row:
            continue
        rows.append(row)
        if len(rows) == chunk:
            yield header, rows, *_arrays(rows, len(header) - 1)
            rows = []
    if rows:
        yield header, rows, *_arrays(rows, len(header) - 1)


def _arrays(rows: list[list[str]], c: int) -> tuple[np.ndarray, np.ndarray]:
    ts = np.array([parse_csv_ts(r[0]) for r in rows])
    vals = np.array([[_num(v) for v in (r[1:] + [""] * c)[:c]] for r in rows])
    return ts, vals


def result_header(channels: list[str]) -> list[str]:
    multi = len(channels) > 1
    per_ch = [f"predicted_{c}" for c in channels] + [f"z_{c}" for c in channels]
    if multi:
        per_ch += [f"attribution_{c}" for c in channels]
    return [
        "score",
        "smoothed_score",
        "likelihood",
        "threshold",
        "is_anomaly",
        "kind",
        "severity",
        "warming_up",
        "gap_reset",
        *per_ch,
        "reason",
    ]


def result_rows(res: StepResult) -> Iterator[list[str]]:
    multi = res.predicted.shape[1] > 1
    for i in range(len(res)):
        if not res.accepted[i]:
            blanks = [""] * (9 + res.predicted.shape[1] * (3 if multi else 2))
            yield [*blanks, str(res.reason[i])]
            continue
        per_ch = [_f(v) for v in res.predicted[i]] + [_f(v) for v in res.z[i]]
        if multi:
            per_ch += [_f(v) for v in res.attribution[i]]
        yield [
            _f(res.raw_score[i]),
            _f(res.smoothed_score[i]),
            _f(res.likelihood[i]),
            _f(res.threshold[i]),
            str(int(res.is_anomaly[i])),
            KINDS[res.kind[i]] or "",
            SEVERITIES[res.severity[i]] or "",
            str(int(res.warming_up[i])),
            str(int(res.gap_reset[i])),
            *per_ch,
            "",
        ]


def _f(v: float) -> str:
    return "" if math.isnan(v) else repr(float(v)) if math.isinf(v) else f"{v:.6g}"


def open_out(path: str | None) -> TextIO:
    import sys

    return sys.stdout if path in (None, "-") else Path(path).open("w", newline="")
