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

The return (``seasonal_return``): ``L`` absorbs a temporary move too — a level shift, a drift, a
stuck run — so the reading that comes back to the device's usual level looked like a shift of its
own, and the check raised a contextual alert 6–10 readings after the move ended (185 of the 284
contextual false positives on the simulated univariate fleet, built-in model). A second, slow level
offset (EWMA at ``SLOW_ALPHA``, ~500 readings) remembers where the device was; a reading is judged
against whichever of the two levels it is closer to, and the ring remembers it relative to that
level (relative to the fast one, the next period's bins would hold the move's offset: 132 contextual
false positives a day later when it was tried).

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
#: EWMA weight of the slow level offset (a memory of ~500 readings).
SLOW_ALPHA = 0.002


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
    Field("slow_level", CHANNELS),  # the level offset at SLOW_ALPHA: where a temporary move returns
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
def _step(e, rms, ready):
    """A residual as it moves a level offset: clipped at CLIP RMS once the RMS is learnt."""
    return max(min(e, CLIP * rms), -CLIP * rms) if ready else e


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
        lvl, slow = row[o.level + j], row[o.slow_level + j]
        e = x[j] - ref[j] - lvl if here else 0.0
        e_slow = x[j] - ref[j] - slow if here else 0.0
        e_seen = e  # the level's own update follows its residual
        use_slow = P.seasonal_return and abs(e_slow) < abs(e)
        if use_slow:
            e = e_slow  # back where the level was before a temporary move: not a surprise
        n, ms = row[o.rms_count + j], row[o.mean_square + j]
        ready = n >= need
        rms = floored_std(math.sqrt(ms), ref[j], P.std_floor_abs, P.std_floor_rel)
        scored[j] = here and ready
        z[j] = e / rms if scored[j] else 0.0
        new_lvl = lvl + P.seasonal_level_alpha * _step(e_seen, rms, ready) if here else lvl
        row[o.level + j] = new_lvl
        if here:
            row[o.slow_level + j] = slow + SLOW_ALPHA * _step(e_slow, rms, ready)
        remember[j] = observed[j] and not (scored[j] and abs(z[j]) > CLIP)
        ref[j] = x[j] - (row[o.slow_level + j] if use_slow else new_lvl)  # what the ring remembers
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
