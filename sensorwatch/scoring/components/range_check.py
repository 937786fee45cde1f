"""Range check (``range_margin``): after warm-up, ``range_warmup`` scored readings *and*
``range_arm_s`` (a day) since the device's first reading, a value outside the range seen so far by
more than ``range_margin`` of that range is a hard hit (likelihood exactly 1). The range learns from
every observed value. The period: a range that has not seen a whole daily cycle does not mean
anything yet — with ``make run``'s devices at 2 readings/s the check armed after 150 s on a range
barely wider than the noise, and gave 278 of its 377 false events. With 5-minute data (NAB, the
simulated fleet) a day is 288 readings, below ``range_warmup``: nothing changes there.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import CHANNELS, SCALAR, Field, offsets_type

NAME = "range_check"
STATE = (
    Field("low", CHANNELS, math.inf),
    Field("high", CHANNELS, -math.inf),
    Field("since", SCALAR, math.nan),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return setup.cfg.range_margin is not None  # type: ignore[attr-defined]


@jit
def check(row, o, x, observed, armed, margin_rel, ts, period_s):
    """Whether any observed channel is outside the learnt range (before this reading) by more than
    the margin; then widen the range. ``armed``: the caller's warm-up conditions hold; the range must
    also have been learnt for ``period_s`` seconds (since the first reading, ``ts`` now)."""
    if math.isnan(row[o.since]):
        row[o.since] = ts
    armed = armed and ts - row[o.since] >= period_s
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
