"""Range check (``range_margin``): after warm-up and ``range_warmup`` scored readings, a value outside
the range seen so far by more than ``range_margin`` of that range is a hard hit (likelihood exactly
1). The range learns from every observed value.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "range_check"
STATE = (Field("low", CHANNELS, math.inf), Field("high", CHANNELS, -math.inf))
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return setup.cfg.range_margin is not None  # type: ignore[attr-defined]


@jit
def check(row, o, x, observed, armed, margin_rel):
    """Whether any observed channel is outside the learnt range (before this reading) by more than
    the margin; then widen the range. ``armed``: the caller's warm-up conditions hold."""
    outside = False
    for j in range(x.size):
        if not observed[j]:
            continue
        lo, hi = row[o.low + j], row[o.high + j]
        margin = margin_rel * (hi - lo)
        if math.isfinite(hi - lo) and (x[j] < lo - margin or x[j] > hi + margin):
            outside = True
        row[o.low + j], row[o.high + j] = min(lo, x[j]), max(hi, x[j])
    return outside and armed
