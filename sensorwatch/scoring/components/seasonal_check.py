"""Seasonal context check (``seasonal_check``): a second, model-independent expert that compares
each reading with the device's mean reading in the same time bin one ``seasonal_period_s`` earlier.

An additive season-plus-level model per device and channel: a ring (in place) holds, per bin, the
mean *level-free* reading ``x − L`` one period earlier (``m``), and ``L`` is the level offset since.
For an observed channel with a remembered bin: ``d = x − m``, residual ``e = d − L``, ``z = e / RMS``
of past residuals (floored like the normaliser's std); then ``L`` moves towards ``d`` by
``seasonal_level_alpha`` of ``e`` (clipped at ``CLIP`` RMS), so a level shift stops being surprising
once it has persisted while a reading that breaks the daily shape does not. Only ordinary readings
(``|z| ≤ CLIP`` or no residual yet) are remembered: an anomalous stretch leaves its bins empty, so
the check abstains there one period later instead of raising an echo.

Its raw scores get their own likelihood (:func:`~sensorwatch.scoring.components.likelihood.short_term_tail`
over its own fields), which counts once it has seen a full period of its own scores; the more
surprising of the forecast and seasonal tails counts, times 2 (Bonferroni) where both speak.
Memory with the defaults (hourly bins, a day): 25 slots, about 0.4 KB per univariate device.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import (
    RECAL_MIN,
    floored_std,
    jit,
    ring_lookup,
    ring_update,
    rms_update,
)
from sensorwatch.scoring.components.likelihood import short_ring
from sensorwatch.scoring.features import season_slots
from sensorwatch.scoring.state import CHANNELS, SCALAR, Field, offsets_type

NAME = "seasonal_check"
#: Residuals beyond this many RMS are not remembered, and move the level offset by at most this.
CLIP = 3.0


def _slots(c: int, s: object) -> tuple[int, ...]:
    cfg = s.cfg  # type: ignore[attr-defined]
    return (season_slots(cfg.seasonal_bin_s, cfg.seasonal_period_s),)


def _ring(c: int, s: object) -> tuple[int, ...]:
    return (*_slots(c, s), c)


STATE = (
    Field("mean", _ring, store="memory32"),
    Field("count", _ring, store="memory32"),
    Field("bin", _slots, -1.0, store="memory64"),
    Field("level", CHANNELS),
    Field("rms_count", CHANNELS),
    Field("mean_square", CHANNELS),
    Field("scores", SCALAR),  # readings with a seasonal residual so far
    Field("short_ring", short_ring),
    Field("long_mean", SCALAR),
    Field("long_var", SCALAR),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return bool(setup.cfg.seasonal_check)  # type: ignore[attr-defined]


@jit
def residuals(
    row, o, mem32, mem64, m, ts, x, observed, P, z, scored, ref, present, remember, undo, undo_n
) -> None:
    """Fill ``z`` and ``scored`` (C,); update the level, the RMS and the ring. ``ref``,
    ``present`` and ``remember`` are scratch (C,)."""
    c = x.size
    slots = P.seasonal_slots
    ring_lookup(
        mem32,
        mem64,
        m,
        o.mean,
        o.count,
        o.bin,
        slots,
        math.floor(ts / P.seasonal_bin_s) - P.seasonal_lag,
        ref,
        present,
    )
    need = max(RECAL_MIN, P.warmup)
    for j in range(c):
        here = present[j] and observed[j]
        lvl = row[o.level + j]
        e = x[j] - ref[j] - lvl if here else 0.0
        n, ms = row[o.rms_count + j], row[o.mean_square + j]
        ready = n >= need
        rms = floored_std(math.sqrt(ms), ref[j], P.std_floor_abs, P.std_floor_rel)
        scored[j] = here and ready
        z[j] = e / rms if scored[j] else 0.0
        step = max(min(e, CLIP * rms), -CLIP * rms) if ready else e
        new_lvl = lvl + P.seasonal_level_alpha * step if here else lvl
        row[o.level + j] = new_lvl
        remember[j] = observed[j] and not (scored[j] and abs(z[j]) > CLIP)
        ref[j] = x[j] - new_lvl  # what the ring remembers (level-free)
        if here:
            row[o.rms_count + j], row[o.mean_square + j] = rms_update(n, ms, e, ready, P.seasonal_window)
    ring_update(
        mem32,
        mem64,
        m,
        o.mean,
        o.count,
        o.bin,
        slots,
        math.floor(ts / P.seasonal_bin_s),
        ref,
        remember,
        undo,
        undo_n,
    )
