"""The decision: ``is_anomaly`` from the components' outputs, kept apart from scoring.

* calibrator ``likelihood``: likelihood ≥ ``likelihood_threshold``; with the alert filter, only the
  first reading of an episode at that cut (a reading whose predecessor was already that surprising,
  before filtering, continues the episode);
* calibrator ``threshold``: smoothed score above the dynamic threshold ε;

either way a *hard* hit (range check, spike check, a stuck run past the cut) is an anomaly for as long as it
lasts, and nothing is one while warming up or without a prediction.
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
