"""Calibration details behind the NAB evaluation: an order-preserving likelihood without ties and
one alert per episode (Numenta's filter)."""

from __future__ import annotations

import math

import numpy as np
import torch

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.scoring.components.common import surprise_to_likelihood


def test_likelihood_is_exact_below_eight_digits_and_never_saturates() -> None:
    s = [0.0, 1.0, 4.0, 8.0]
    lik = [surprise_to_likelihood(v) for v in s]
    np.testing.assert_allclose(lik, [1 - 10 ** (-v) for v in s], rtol=1e-12)
    lik_big = np.array([surprise_to_likelihood(v) for v in (8.5, 9.0, 20.0, 65.0, 300.0, 1e4)])
    assert (lik_big < 1.0).all()
    assert (np.diff(lik_big) > 0).all()  # strictly increasing: no ties in float64
    assert surprise_to_likelihood(math.inf) == 1.0
    # The default decision cut 0.9999 is a surprise of 4 decimal digits.
    assert math.isclose(-math.log10(1 - ScorerConfig().likelihood_threshold), 4.0, rel_tol=1e-9)


def _episode(alert_filter: bool, flags: list[bool] | None = None) -> list[float]:
    """Likelihoods of a noisy series with a sustained deviation (readings 200–209) through the scorer
    (built-in model, only the forecast likelihood speaking)."""
    cfg = ScorerConfig(
        alert_filter=alert_filter, stuck_check=False, range_margin=None, seasonal_check=False, spike_z=None
    )
    scorer = StreamScorer.builtin(config=cfg)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300)
    x[200:210] += 12.0 * (-1.0) ** np.arange(10)  # a persistence forecast misses every one
    res = scorer.step(ReadingBatch(["d"] * 300, 1e9 + 60.0 * np.arange(300), x[:, None]))
    if flags is not None:
        flags.extend(res.is_anomaly.tolist())
    return res.likelihood.tolist()


def test_alert_filter_keeps_the_first_red_reading_of_a_run() -> None:
    cfg = ScorerConfig()
    on = -torch.log10(1 - torch.tensor(_episode(True)[195:215], dtype=torch.float64))
    off = -torch.log10(1 - torch.tensor(_episode(False)[195:215], dtype=torch.float64))
    red = off >= cfg.filter_red
    assert red.sum() >= 3  # the unfiltered run has several red readings in a row
    first = int(torch.nonzero(red)[0])
    assert on[first] == off[first]  # the first alert of the run stands
    follow = red.clone()
    follow[first] = False
    follow &= torch.roll(red, 1)
    assert (on[follow] < cfg.filter_yellow).all()  # the rest of the run is lowered below yellow
    assert (on[~follow] == off[~follow]).all()  # nothing else changes
    # Order among lowered readings is kept (no ties created by the filter).
    assert torch.equal(torch.argsort(on[follow]), torch.argsort(off[follow]))


def test_one_flag_per_episode_at_the_decision_cut() -> None:
    """With the filter, is_anomaly marks the first reading of a run that is at least as surprising as
    the decision cut (4 digits), not every reading of it — also where the run stays below red (5)."""
    on: list[bool] = []
    off: list[bool] = []
    lik_off = _episode(False, off)
    _episode(True, on)
    cut = ScorerConfig().likelihood_threshold
    above = [lik >= cut for lik in lik_off]
    assert sum(above[195:215]) >= 3
    assert sum(off[195:215]) == sum(above[195:215])
    first = above.index(True, 195)
    assert on[first]
    assert sum(on[195:215]) == 1
