"""Online adaptation (``adapt_lags``): a per-device, per-channel linear correction of the forecast,
learnt by recursive least squares on the device's own recent values — the small part of the model
that learns each device after it ships.

A forecaster trained on a fleet (or the built-in persistence one) is not the best one-step predictor
of any one device: on a white-noise channel around a slow cycle, persistence's residual has σ√2 where
averaging the last few readings gets close to σ. The correction is

    forecast = model + clip(Σₖ wₖ · (lagₖ − model), ±CORRECTION_CLIP units)

over the channel's last ``p`` (cleaned) values ``lagₖ``: translation-free (a level shift moves the
model and the lags together), and zero until the device has taught it something. ``w`` is fitted
by exponentially forgetting RLS (``FORGET``) on regressors divided by the channel's unit (the mean
absolute corrected residual × √(π/2), its own: the spike check's is not learnt yet when this starts);
the inverse-covariance is held to a trace of ``TRACE_CAP`` so that a channel that stays still for a
long time (no excitation) cannot wind it up. Every residual used by the downstream checks — z, the
likelihood, the spike and range checks' noise — is the corrected one, so a sharper forecast makes
every check more sensitive at the same false-alarm rate.

Robust to what it is there to see:

1. The update uses the residual clipped at ``UPDATE_CLIP`` units: a spike moves ``w`` by no more
   than a 3σ reading does.
2. A value ``LAG_CLIP`` units or more off its forecast is an outlier: its lag holds it clipped to
   ``LAG_CLIP`` units of the forecast, so a spike echoes into the next ``p`` forecasts by at most
   that much (a missing reading's lag is its forecast).
3. Regressors are clipped at ``LAG_CLIP`` units, and the fit learns nothing while any lag is further
   than that from the model's forecast: a model fed a spike forecasts near it (its echo), and one
   such step with regressors of ~60 units moved the weights enough to raise a false alert 5
   readings later (``tests/e2e/test_mqtt.py``'s fleet of sines with +8 spikes).

Measured (``docs/detection.md``, ``scripts/eval_simulated.py``): the robust σ of the residual over
the noise's σ on the simulated univariate fleet falls 1.43 → 1.18 with the built-in forecaster and
1.33 → 1.19 with ``univariate/2`` (p = 4, ``scripts/residual_ratio.py``).
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import SIGMA_PER_MAD, jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "adapt"


def LAGS(channels: int, setup: object) -> tuple[int, ...]:
    return (channels, setup.cfg.adapt_lags)  # type: ignore[attr-defined]


def GAINS(channels: int, setup: object) -> tuple[int, ...]:
    p = setup.cfg.adapt_lags  # type: ignore[attr-defined]
    return (channels, p, p)


STATE = (
    Field("model_mean", CHANNELS, 0.0),  # the model's own forecast of this reading (raw units)
    Field("count", CHANNELS, 0.0),  # corrected residuals the unit has learnt from
    Field("abs_mean", CHANNELS, 0.0),  # their running mean absolute value
    Field("filled", CHANNELS, 0.0),  # lags filled so far (≤ p)
    Field("lags", LAGS, 0.0),  # the last p cleaned values, newest first
    Field("weights", LAGS, 0.0),
    Field("gain", GAINS, 0.0),  # RLS inverse covariance (all 0: not started)
)
Offsets = offsets_type(STATE)

#: Most lags (``ScorerConfig.adapt_lags``); the kernel's scratch holds 2 × this.
MAX_LAGS = 16
#: Exponential forgetting of the RLS fit (an effective memory of 1 / (1 − FORGET) = 200 readings).
FORGET = 0.995
#: Largest trace of the inverse covariance (and its start, spread over the diagonal).
TRACE_CAP = 0.1
#: The correction is at most this many units.
CORRECTION_CLIP = 3.0
#: A residual counts as at most this many units in the fit.
UPDATE_CLIP = 3.0
#: A lag holds the value within this many units of the forecast.
LAG_CLIP = 4.0
#: Horizon (readings) of the unit's running mean; residuals before MIN_COUNT set the unit unclipped.
UNIT_WINDOW = 500.0
MIN_COUNT = 16.0


def enabled(setup: object) -> bool:
    return setup.cfg.adapt_lags is not None  # type: ignore[attr-defined]


@jit
def on(o) -> bool:
    """Whether the component is on (its offsets are -1 when it is off)."""
    return o.count >= 0


@jit
def lags_of(o, c):
    """The number of lags p, from the layout (``lags`` is C × p, ``weights`` follows it)."""
    return (o.weights - o.lags) // c


@jit
def _unit(row, o, j):
    """The channel's unit (raw units) once learnt, else 0."""
    if row[o.count + j] < MIN_COUNT:
        return 0.0
    return SIGMA_PER_MAD * row[o.abs_mean + j]


@jit
def correct(row, o, pred_mean, c, p) -> None:
    """Keep the model's forecasts and replace ``row[pred_mean + j]`` (``c`` channels) by the corrected
    ones."""
    for j in range(c):
        m = row[pred_mean + j]
        row[o.model_mean + j] = m
        u = _unit(row, o, j)
        if u <= 0.0 or row[o.filled + j] < p or not math.isfinite(m):
            continue
        s = 0.0
        for k in range(p):
            s += row[o.weights + j * p + k] * _regressor(row, o, j, p, k, m, u)
        row[pred_mean + j] = m + min(max(s, -CORRECTION_CLIP), CORRECTION_CLIP) * u


@jit
def learn(row, o, x, observed, has_pred, pred_mean, p, scratch) -> None:
    """After the residuals: fit the weights to this reading's residual and push its cleaned value.
    ``scratch``: at least 2 p floats (no allocation per reading)."""
    c = x.size
    for j in range(c):
        f = row[pred_mean + j]  # the corrected forecast of this reading
        m = row[o.model_mean + j]
        ok = has_pred and math.isfinite(m) and math.isfinite(f)
        u = _unit(row, o, j)
        lag = x[j] if observed[j] else f
        if ok and observed[j]:
            e = x[j] - f
            n = row[o.count + j]
            far = u > 0.0 and abs(e) >= LAG_CLIP * u
            a = min(abs(e), LAG_CLIP * u) if n >= MIN_COUNT else abs(e)
            row[o.abs_mean + j] += (a - row[o.abs_mean + j]) / min(n + 1.0, UNIT_WINDOW)
            row[o.count + j] = n + 1.0
            if far:  # an outlier is not history: its lag holds it clipped to LAG_CLIP units
                lag = min(max(x[j], f - LAG_CLIP * u), f + LAG_CLIP * u)
            if u > 0.0 and row[o.filled + j] >= p and _in_line(row, o, j, p, m, u):
                _rls(row, o, j, p, m, u, min(max(e / u, -UPDATE_CLIP), UPDATE_CLIP), scratch)
        elif not math.isfinite(lag):
            continue  # missing, and no forecast to stand in for it
        base = o.lags + j * p
        for k in range(p - 1, 0, -1):
            row[base + k] = row[base + k - 1]
        row[base] = lag
        row[o.filled + j] = min(row[o.filled + j] + 1.0, float(p))


@jit
def _regressor(row, o, j, p, k, m, u):
    """Lag k of channel j relative to the model's forecast ``m``, in units ``u``, clipped."""
    r = (row[o.lags + j * p + k] - m) / u
    return min(max(r, -LAG_CLIP), LAG_CLIP)


@jit
def _in_line(row, o, j, p, m, u):
    """Whether every lag is within LAG_CLIP units of the model's forecast: where the model is off
    (its echo of a spike it was fed, the first readings after a shift) the fit learns nothing."""
    inside = True  # (numba compiles no generator for all())
    for k in range(p):
        inside = inside and abs(row[o.lags + j * p + k] - m) <= LAG_CLIP * u
    return inside


@jit
def _rls(row, o, j, p, m, u, e, scratch) -> None:
    """One exponentially forgetting RLS step on channel j: regressors (lag − model) / unit, target the
    clipped corrected residual in units."""
    g0 = o.gain + j * p * p
    h, ph = scratch[:p], scratch[p : 2 * p]
    if row[g0] == 0.0:  # a positive definite matrix has a positive diagonal: not started
        for a in range(p):
            for b in range(p):
                row[g0 + a * p + b] = TRACE_CAP / p if a == b else 0.0
    for k in range(p):
        h[k] = _regressor(row, o, j, p, k, m, u)
    denom = FORGET
    for a in range(p):
        s = 0.0
        for b in range(p):
            s += row[g0 + a * p + b] * h[b]
        ph[a] = s
        denom += h[a] * s
    trace = 0.0
    for a in range(p):
        row[o.weights + j * p + a] += ph[a] / denom * e
        for b in range(p):
            v = (row[g0 + a * p + b] - ph[a] * ph[b] / denom) / FORGET
            row[g0 + a * p + b] = v
        trace += row[g0 + a * p + a]
    if trace > TRACE_CAP:
        scale = TRACE_CAP / trace
        for a in range(p * p):
            row[g0 + a] *= scale
