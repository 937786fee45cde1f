"""Numenta's alert filter (``alert_filter``): a reading at least ``filter_red`` digits surprising
whose predecessor (unfiltered) also was is lowered to ``filter_yellow · S / (S + 1)`` digits
(< ``filter_yellow``, order-preserving, no ties). Range-check hits (S = ∞) are never lowered. One
alert per episode instead of a run of them (+19 NAB points measured).
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import SCALAR, Field, offsets_type

NAME = "alert_filter"
STATE = (Field("previous_surprise", SCALAR),)
Offsets = offsets_type(STATE)
#: Surprise a range-check hit stands for when it is remembered (finite, above realistic tails).
SURPRISE_CAP = 100.0


def enabled(setup: object) -> bool:
    return bool(setup.cfg.alert_filter)  # type: ignore[attr-defined]


@jit
def apply(surprise, previous, red, yellow):
    """(filtered surprise, the value to remember as ``previous_surprise``)."""
    hit = surprise >= red and previous >= red and math.isfinite(surprise)
    out = yellow * surprise / (surprise + 1.0) if hit else surprise
    return out, min(surprise, SURPRISE_CAP)
