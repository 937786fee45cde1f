"""Stuck-sensor check (``stuck_check``): a run of r identical values on a channel whose
(Laplace-smoothed) repeat rate so far is p has tail p^r, so a noisy sensor that freezes is caught
while one that routinely repeats is not. Returns the log tail, minimised over channels.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "stuck_check"
STATE = (
    Field("previous", CHANNELS, math.nan),
    Field("compared", CHANNELS),  # readings compared with their predecessor
    Field("repeat_rate", CHANNELS),
    Field("run", CHANNELS),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return bool(setup.cfg.stuck_check)  # type: ignore[attr-defined]


@jit
def log_tail(row, o, x, observed, window):
    out = 0.0
    for j in range(x.size):
        prev = row[o.previous + j]
        cmp = observed[j] and math.isfinite(prev)
        rep = cmp and x[j] == prev
        n = row[o.compared + j]
        rate = row[o.repeat_rate + j]
        m = min(n, window)
        p = (rate * m + 1.0) / (m + 2.0)
        run = row[o.run + j] + 1.0 if rep else (0.0 if cmp else row[o.run + j])
        if run > 0:
            out = min(out, run * math.log(p))
        if cmp:
            n += 1.0
            row[o.compared + j] = n
            row[o.repeat_rate + j] = rate + (1.0 / min(max(n, 1.0), window)) * ((1.0 if rep else 0.0) - rate)
        row[o.run + j] = run
        if observed[j]:
            row[o.previous + j] = x[j]
    return out
