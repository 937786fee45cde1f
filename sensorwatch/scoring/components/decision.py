"""The decision: ``is_anomaly`` from the components' outputs, kept apart from scoring.

* calibrator ``likelihood``: likelihood ≥ ``likelihood_threshold``; with the alert filter, only the
  first reading of an episode at that cut (a reading whose predecessor was already that surprising,
  before filtering, continues the episode);
* calibrator ``threshold``: smoothed score above the dynamic threshold ε;

either way a *hard* hit (range check, spike check, a stuck run past the cut) is an anomaly for as
long as it lasts, and nothing is one while warming up or without a prediction.

The **kind** of an anomaly (``StepResult.kind``, codes into ``batch.KINDS``) says which check made
it, the most specific first: ``out_of_range`` (beyond the range seen), ``spike`` (one residual far
outside the device's own), ``stuck`` (a run of identical values), ``contextual`` (the seasonal
check was the more surprising expert: a value unusual for its time of day), else ``pattern`` (the
likelihood of the recent residuals: level shifts, drifts, noise bursts; or the dynamic threshold).

The **severity** of an anomaly (``StepResult.severity``, codes into ``batch.SEVERITIES``) ranks how
urgently an operator should look, from the same evidence:

* ``critical``: beyond the range ever seen, or a reading ``CRITICAL_SIGMA`` (10) or more standard
  deviations of its recalibrated residual off its forecast on some channel;
* ``high``: a spike (≥ ``spike_z`` robust σ), a stuck sensor, or a likelihood surprise of
  ``HIGH_DIGITS`` (8) decimal digits or more;
* ``medium``: a surprise of ``filter_red`` (5) digits or more (likelihood ≥ 0.99999);
* ``low``: any other anomaly (at the cut: 4 digits, likelihood ≥ 0.9999).
"""

from __future__ import annotations

from sensorwatch.scoring.components.common import jit


@jit
def decide(P, likelihood, smoothed, epsilon, hard, previous_surprise, scored, armed):
    if P.threshold_calibrator:
        flag = smoothed > epsilon
    else:
        flag = likelihood >= P.likelihood_threshold
        if P.alert_filter and previous_surprise >= P.episode_cut:
            flag = False
    return (flag or hard) and scored and armed


#: Kind codes (``sensorwatch.scoring.batch.KINDS`` names them); 0: not an anomaly.
PATTERN, CONTEXTUAL, SPIKE, STUCK, OUT_OF_RANGE = 1, 2, 3, 4, 5


@jit
def kind_of(anomaly, out_of_range, spike, stuck, seasonal_won):
    if not anomaly:
        return 0
    if out_of_range:
        return OUT_OF_RANGE
    if spike:
        return SPIKE
    if stuck:
        return STUCK
    if seasonal_won:
        return CONTEXTUAL
    return PATTERN


#: Severity codes (``sensorwatch.scoring.batch.SEVERITIES`` names them); 0: not an anomaly.
LOW, MEDIUM, HIGH, CRITICAL = 1, 2, 3, 4
#: σ off the forecast (recalibrated z) that makes any anomaly critical.
CRITICAL_SIGMA = 10.0
#: Surprise (decimal digits) that makes a likelihood anomaly high.
HIGH_DIGITS = 8.0


@jit
def severity_of(kind, surprise, deviation, red):
    """``kind``: :func:`kind_of`'s code; ``surprise``: the likelihood's, before the alert filter
    (digits); ``deviation``: the largest |z| over the reading's channels; ``red``: filter_red."""
    if kind == 0:
        return 0
    if kind == OUT_OF_RANGE or deviation >= CRITICAL_SIGMA:
        return CRITICAL
    if kind in (SPIKE, STUCK) or surprise >= HIGH_DIGITS:
        return HIGH
    if surprise >= red:
        return MEDIUM
    return LOW
