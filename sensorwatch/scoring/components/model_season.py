"""Extra inputs of a seasonal (level-free) forecaster (``ForecasterConfig.seasonal``): the step since
the previous reading and the device's mean reading in the time bin one day and one week before the
next reading is expected, relative to the current reading, with presence masks.

Memory: a per-device ring of bin means over a week plus one bin (``season_bin_s`` bins), in place.
Same formulas as :func:`sensorwatch.scoring.features.seasonal_inputs` (training).
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit, ring_lookup, ring_update
from sensorwatch.scoring.features import SEASON_CLIP, season_lags, season_slots
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "model_season"


def _slots(c: int, s: object) -> tuple[int, ...]:
    return (season_slots(s.model.season_bin_s),)  # type: ignore[attr-defined]


def _ring(c: int, s: object) -> tuple[int, ...]:
    return (*_slots(c, s), c)


STATE = (
    Field("last_x", CHANNELS, math.nan),
    Field("mean", _ring, store="memory32"),
    Field("count", _ring, store="memory32"),
    Field("bin", _slots, -1.0, store="memory64"),
)
Offsets = offsets_type(STATE)
#: Clip of a normalised step or lag value.
CLIP = SEASON_CLIP


def enabled(setup: object) -> bool:
    return bool(setup.model.seasonal)  # type: ignore[attr-defined]


def lags(setup: object) -> tuple[int, int]:
    return season_lags(setup.model.season_bin_s)  # type: ignore[attr-defined]


@jit
def inputs(
    row,
    o,
    mem32,
    mem64,
    m,
    ts,
    next_ts,
    x,
    x_filled,
    observed,
    scale,
    gap,
    P,
    feats,
    ref,
    present,
    undo,
    undo_n,
) -> None:
    """Write the step (C) and the day/week lags with masks (4C) into ``feats``; fold the reading
    into the ring first. ``ref``/``present`` are scratch (C,)."""
    c = x.size
    for j in range(c):
        prev = math.nan if gap else row[o.last_x + j]
        step = (x_filled[j] - prev) / scale[j] if math.isfinite(prev) else 0.0
        feats[j] = min(max(step, -CLIP), CLIP)
        row[o.last_x + j] = x_filled[j]
    slots = P.model_slots
    ring_update(
        mem32,
        mem64,
        m,
        o.mean,
        o.count,
        o.bin,
        slots,
        math.floor(ts / P.model_bin_s),
        x,
        observed,
        undo,
        undo_n,
    )
    base = c
    for lag in (P.model_day_lag, P.model_week_lag):
        b = math.floor(next_ts / P.model_bin_s) - lag
        ring_lookup(mem32, mem64, m, o.mean, o.count, o.bin, slots, b, ref, present)
        for j in range(c):
            v = (ref[j] - x_filled[j]) / scale[j]
            feats[base + j] = min(max(v, -CLIP), CLIP) if present[j] else 0.0
            feats[base + c + j] = 1.0 if present[j] else 0.0
        base += 2 * c
