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
