"""Range check (``range_margin``): after warm-up and ``range_warmup`` scored readings, a value
outside the range seen so far by more than ``range_margin`` of that range is a hard hit (likelihood
exactly 1), on a channel whose range spans at least ``range_span`` robust σ of the forecast's
residuals (the spike check's bulk unit). The range learns from every observed value.

The span: a range no wider than the noise's own extremes (a Gaussian's n readings span ~6σ at 300,
~9σ at 10⁵) does not mean anything yet — with ``make run``'s devices at 2 readings/s the check armed
after 150 s on a range barely wider than the noise, and gave 278 of its 377 false events. It used to
wait for a day of history instead (``range_arm_s``, removed), which kept it off SKAB's 400-second
testbed runs for good (F1c 0.51 → 0.77 with the span; ``docs/detection.md``).
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "range_check"
STATE = (
    Field("low", CHANNELS, math.inf),
    Field("high", CHANNELS, -math.inf),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return setup.cfg.range_margin is not None  # type: ignore[attr-defined]


@jit
def check(row, o, x, observed, armed, margin_rel, noise, span_min):
    """Whether any observed channel is outside the learnt range (before this reading) by more than
    the margin; then widen the range. ``armed``: the caller's warm-up conditions hold; a channel's
    range must also span at least ``span_min`` times its forecast's ``noise`` (NaN: unknown, no
    condition)."""
    outside = False
    for j in range(x.size):
        if not observed[j]:
            continue
        lo, hi = row[o.low + j], row[o.high + j]
        margin = margin_rel * (hi - lo)
        wide = not (span_min > 0.0 and noise[j] > 0.0 and hi - lo < span_min * noise[j])
        if wide and math.isfinite(hi - lo) and (x[j] < lo - margin or x[j] > hi + margin):
            outside = True
        row[o.low + j], row[o.high + j] = min(lo, x[j]), max(hi, x[j])
    return outside and armed
