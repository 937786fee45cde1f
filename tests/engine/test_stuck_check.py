"""The stuck check judges a run of identical values by the channel's own run lengths: a noisy sensor
that freezes is caught within two repeats (and again the next time: flagged runs do not teach it),
a channel that has never changed is not stuck, and a channel that routinely sits flat for a while
(quantised, idle) raises nothing for runs like its usual ones but does for one far longer."""

from __future__ import annotations

import numpy as np

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.scoring.batch import KINDS

CFG = ScorerConfig(spike_z=None, range_margin=None, seasonal_check=False)


def stuck_flags(x: np.ndarray) -> np.ndarray:
    n, c = x.shape
    m, version = load_default_or_builtin("builtin", None, c)
    ts = 1_767_225_600.0 + 60.0 * np.arange(n)
    res = StreamScorer(m, CFG, model_version=version).step(ReadingBatch(["d"] * n, ts, x))
    return res.is_anomaly & (np.array([KINDS[k] for k in res.kind]) == "stuck")


def test_a_noisy_sensor_that_freezes_is_caught_at_once_and_again() -> None:
    x = np.random.default_rng(0).standard_normal(3000)
    for start in (1000, 2000):
        x[start : start + 30] = x[start]
    flags = stuck_flags(x[:, None])
    for start in (1000, 2000):
        first = start + int(np.argmax(flags[start : start + 30]))
        assert flags[start : start + 30].any(), start
        assert first <= start + 2, (start, first)
    assert not flags[:1000].any()
    assert not flags[1100:2000].any()


def test_a_channel_that_never_changed_is_not_stuck() -> None:
    assert not stuck_flags(np.full((2000, 1), 3.0)).any()


def routinely_flat(seed: int, n: int) -> np.ndarray:
    """Quantised steps with flat stretches of 1–40 readings (an idle server metric)."""
    rng = np.random.default_rng(seed)
    out, level = [], 0.0
    while len(out) < n:
        level += rng.choice([-1.0, 1.0])
        out += [level] * int(rng.integers(1, 41))
    return np.array(out[:n])


def test_runs_like_the_usual_ones_raise_nothing_a_far_longer_one_does() -> None:
    x = routinely_flat(1, 6000)
    normal = stuck_flags(x[:, None])
    assert normal[1000:].sum() == 0, np.flatnonzero(normal)[:10]
    x[5000:5400] = x[5000]  # ten times the longest usual stretch
    flags = stuck_flags(x[:, None])
    assert flags[5000:5400].any()
    assert not flags[5000:5040].any()  # as long as the usual ones: not yet


def test_a_frozen_channel_among_eight_is_caught() -> None:
    """Eight noisy channels, tested together (the tail less log 8): nothing before, and the frozen
    channel is caught within a few readings."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 8))
    x[2000:2030, 5] = x[2000, 5]
    flags = stuck_flags(x)
    assert not flags[:2000].any()
    assert flags[2000:2006].any()
