"""Spike check (``spike_z``): after warm-up, a reading whose forecast residual on any channel is at
least ``spike_z`` robust standard deviations of the device's own residuals is an anomaly at that
reading — a hard hit of the *decision*, not of the likelihood. An isolated spike barely moves the
likelihood's 10-reading mean (a +75σ spike on a clean sine reached 0.9998, under the cut), yet any
operator calls it an alert; NAB, whose score is the likelihood column, rewards the likelihood as it
is, so the two stay apart: the likelihood keeps ranking how surprising the recent pattern is, the
decision adds the reading that is far outside anything the device's residuals do.

The unit is the check's own, robust to the anomalies it is there to see: a running mean of the
forecast's absolute residual in raw units over ``window`` readings, each clipped at ``CLIP`` units
(from the ``CLIP_FROM``-th on), times √(π/2) (a Gaussian's σ per mean absolute deviation). It learns
from the ``SKIP``-th scored reading on — within warm-up, so the check is armed the moment warm-up
ends, where the forecast's own RMS learns only after it. Every residual teaches it, a large one as
``CLIP`` units: one spike barely moves it, a channel whose residuals stay large widens it within a
few hundred readings (with hits left out, such channels raised a hit every few readings for ever:
22.7 false alerts per 1,000 readings on the 8-channel simulated fleet, 5.6 now, 2.3 without the
check). Raw units, not the model-relative ``e_rel``: that one grows with the normaliser's std after
a drift (a burst of false hits measured after every simulated drift), and ``e_rel`` over the
normaliser's std shrinks as the std settles (spike recall on the univariate fleet 236 against 257
of 273).

Heavy tails: where the residuals are heavier-tailed than a Gaussian's (quantised or bursty channels,
ASD's server metrics), the mean |residual| underrates them. The unit is then the tracked ``TAIL_P``
quantile of |residual| over a Gaussian's |Z| there (learnt with bounded steps, only while the device
is calm), times a per-channel multiplier that each hit made while calm raises ×exp(``GAIN_STEP``)
and that decays at ``HIT_BUDGET`` per reading, so hits on a channel whose normal history is full of
jumps settle at about the budget's rate (``docs/detection.md``).

The echo: a forecaster that has just been fed a spike predicts near it, so the next readings have
residuals as large (of the opposite sign, and an LSTM may ring for a reading or two more). For
``ECHO`` readings after a hit the channel raises nothing (``quiet`` counts them down): one hit per
spike. A level shift is one hit at its first reading: the forecaster follows the new level within
those readings.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import SIGMA_PER_MAD, jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "spike_check"
STATE = (
    Field("quiet", CHANNELS, 0.0),
    Field("count", CHANNELS, 0.0),
    Field("abs_mean", CHANNELS, 0.0),
    Field("tail", CHANNELS, 0.0),  # running TAIL_P quantile of |residual| in calm readings
    Field("log_gain", CHANNELS, 0.0),  # log of the channel's threshold multiplier (≥ 0)
)
Offsets = offsets_type(STATE)
#: A residual beyond this many units counts as this large in the unit's mean.
CLIP = 4.0
#: A channel's first residuals, left out of its unit (the normaliser's cold start, when the unit's
#: scale is still settling).
SKIP = 16.0
#: Residuals in the unit before it clips the next ones (the first few set its scale).
CLIP_FROM = 4.0
#: Residuals a channel's unit needs before the check speaks on it (SKIP + MIN_COUNT < warm-up).
MIN_COUNT = 16.0
#: Readings after a hit in which the channel raises nothing (the forecaster's echo of the spike).
ECHO = 3.0
#: The quantile of |residual| the tail unit tracks, and a Gaussian's |Z| there (σ per quantile).
TAIL_P = 0.99
TAIL_Z = 2.5758293035489004
#: Step of the quantile tracker in bulk units: an exceedance moves it up by ≈ this, any other
#: reading down by (1 − TAIL_P) × this — one residual, however large, moves it by 0.05 units.
TAIL_STEP = 0.05
#: The false-hit budget: hits per reading (a device's channels together) that the threshold
#: multiplier lets through where even the tail unit underrates the residuals' tail.
HIT_BUDGET = 1e-4
#: log-step of the multiplier per hit made while calm (×1.05); it decays by HIT_BUDGET / channels of
#: that per reading, so it settles where such hits come at the budget's rate.
GAIN_STEP = 0.05


def enabled(setup: object) -> bool:
    return setup.cfg.spike_z is not None  # type: ignore[attr-defined]


@jit
def hit(row, o, e, scored, armed, spike_z, window, calm, ratio, bulk_out):
    """Whether any scored channel's residual ``e`` reaches ``spike_z`` units outside the echo of its
    last hit (``armed``: past warm-up); learns each channel's unit and counts down its echo. The
    tail learns only when ``calm`` (the device's previous reading was not surprising). ``ratio[j]``:
    the residual in the channel's units (0 where not scored), which attributes a hit.
    ``bulk_out[j]``: the channel's bulk unit (a robust σ of its residuals, before this one) once
    learnt, else NaN — the range check's measure of the forecast's noise."""
    any_hit = False
    budget = HIT_BUDGET / e.size
    for j in range(e.size):
        ratio[j] = 0.0
        bulk_out[j] = math.nan
        if not scored[j]:
            continue
        n, mad, quiet, tail = row[o.count + j], row[o.abs_mean + j], row[o.quiet + j], row[o.tail + j]
        log_gain = row[o.log_gain + j]
        learnt = n - SKIP  # residuals in the unit so far
        bulk = SIGMA_PER_MAD * mad
        unit = max(bulk, tail / TAIL_Z) * math.exp(log_gain)
        ready = learnt >= MIN_COUNT and unit > 0.0
        if learnt >= MIN_COUNT:
            bulk_out[j] = bulk
        if ready:
            ratio[j] = abs(e[j]) / unit
        far = ready and quiet == 0.0 and abs(e[j]) >= spike_z * unit
        row[o.quiet + j] = max(quiet - 1.0, 0.0)
        if learnt >= MIN_COUNT:  # the multiplier: up a step per calm hit, down at the budget's rate
            up = 1.0 if far and calm else 0.0
            row[o.log_gain + j] = max(log_gain + GAIN_STEP * (up - budget), 0.0)
        if far:
            any_hit = any_hit or armed
            row[o.quiet + j] = ECHO
        # Every residual teaches the unit, a large one as CLIP units: one spike barely moves it,
        # residuals that stay large (a channel the model no longer follows) widen it within a few
        # hundred readings instead of raising a hit every ECHO + 1 readings for ever.
        row[o.count + j] = n + 1.0
        if learnt < 0.0:
            continue  # the cold start: the normaliser's first readings
        a = abs(e[j])
        if calm:  # the tail: a stochastic-approximation quantile, bounded steps
            step = TAIL_STEP * (bulk if learnt > 0.0 else a)
            row[o.tail + j] = max(tail + step * ((1.0 if a > tail else 0.0) - (1.0 - TAIL_P)), 0.0)
        if learnt >= CLIP_FROM:
            a = min(a, CLIP * unit)  # from the first few on: an early outlier cannot swamp the unit
        row[o.abs_mean + j] = mad + (a - mad) / min(learnt + 1.0, window)
    return any_hit
