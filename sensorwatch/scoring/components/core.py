"""Device bookkeeping: when the last reading came, how many, since the last gap reset.

A gap longer than ``max_gap_s`` resets the forecaster's hidden state and restarts warm-up; the
reading after a gap has no prediction to be scored against.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import SCALAR, Field, offsets_type

NAME = "core"
STATE = (
    Field("last_ts", SCALAR, -math.inf),
    Field("count", SCALAR),
    Field("since_reset", SCALAR),
    Field("last_likelihood", SCALAR, math.nan),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return True


@jit
def begin(row, o, ts, max_gap_s, warmup):
    """(Δt, gap reset?, has a prediction?, readings since reset incl. this one, warming up?)."""
    count = row[o.count]
    fresh = count == 0
    dt = math.nan if fresh else ts - row[o.last_ts]
    gap = (not fresh) and dt > max_gap_s
    has_pred = count > 0 and not gap
    since = 1.0 if gap else row[o.since_reset] + 1.0
    return dt, gap, has_pred, since, since <= warmup


@jit
def finish(row, o, ts, since, has_pred, likelihood) -> None:
    row[o.last_ts] = ts
    row[o.count] += 1.0
    row[o.since_reset] = since
    if has_pred:
        row[o.last_likelihood] = likelihood
