"""Episodes of the lasting checks: a stuck run or an out-of-range stretch is an anomaly at every
reading of it (``is_anomaly``), but one *event* — the service publishes the anomaly that starts it
and one end event at the first reading after it, not one event per reading (a stuck sensor raised
38 events per episode in ``make run`` before). ``continues``: this anomaly is of the same lasting
kind as the device's previous reading; ``ended``: the kind of the episode that ended just before
this reading (0: none). Spikes that follow one another within ``SPIKE_GAP`` readings are one
episode too (a burst: the first is the event, the rest ``continue`` it; no end event, a spike is
over at once) — measured in ``make run``, one device's noise burst had raised a spike event every
four readings. Contextual and pattern anomalies are one reading per episode already (the alert
filter).

An out-of-range stretch stays open through up to ``RANGE_GAP`` readings back inside the range: the
range learns every value, so a level shift or a drift past its edge widens it, and the next readings
fall inside the margin as often as not — each return outside was a new event (``make run``: 2.6
events and 1.4 end notices per injected episode; 1.7 and 0.6 with the gap). Its end notice comes
at the first reading after the gap.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.components.decision import OUT_OF_RANGE, SPIKE, STUCK
from sensorwatch.scoring.state import SCALAR, Field, offsets_type

NAME = "episode"
STATE = (
    Field("active", SCALAR, 0.0),
    Field("since_spike", SCALAR, math.inf),
    Field("since_range", SCALAR, math.inf),
)
#: Readings after a spike within which another spike continues its episode.
SPIKE_GAP = 10.0
#: Readings back inside the range within which an out-of-range reading continues its stretch.
RANGE_GAP = 10.0
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return True


@jit
def track(row, o, kind):
    """(continues, ended kind) of a reading of ``kind`` (0: not an anomaly); remembers the lasting
    kind and the readings since the last spike."""
    active = int(row[o.active])
    lasting = kind if kind in (STUCK, OUT_OF_RANGE) else 0
    since_range = row[o.since_range] + 1.0
    if kind == OUT_OF_RANGE:
        since_range = 0.0
    elif lasting == 0 and active == OUT_OF_RANGE and since_range <= RANGE_GAP:
        lasting = OUT_OF_RANGE  # back inside, within the gap: the stretch is still open
    row[o.since_range] = since_range
    row[o.active] = float(lasting)
    continues = kind != 0 and lasting != 0 and lasting == active
    ended = active if active != 0 and lasting != active else 0
    since = row[o.since_spike] + 1.0
    if kind == SPIKE:
        continues = since <= SPIKE_GAP
        since = 0.0
    row[o.since_spike] = since
    return continues, ended
