"""The seasonal check (a reading against the same hour one day earlier) and residuals on the device's
own scale, with the built-in (persistence) model.

Scenario: a daily sine (amplitude 1, period 288 readings 300 s apart, Gaussian noise σ = 0.05, seed 1)
over ten days, as three devices:

* ``none``: nothing injected (the control);
* ``flat``: on day 8 the daily peak does not happen — the values glide smoothly to 0 and back over
  104 readings (a contextual anomaly: every value is normal for some time of day, and every step is
  small, so a one-step forecast sees nothing);
* ``shift``: +0.6 from reading 7·288 + 100 on, for good (a new normal).

Measured (default config): ``flat`` flagged at readings 2057 and 2114 inside its stretch (max
surprise S = 6.63 digits) and not at all without the seasonal check (max S 1.30); the same hours one
day later max S 0.96 (no echo: the anomalous readings were not remembered); ``shift`` flagged once,
at the shift, and from 60 readings after it on (the next day included) max S 2.34; the control
flags nothing (max S after warm-up 3.44; before the check waited for a full day of its own scores,
reading 577 — the start of its second day of scoring — reached 4.28 and was flagged).
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.scoring.batch import KINDS
from sensorwatch.scoring.components.common import RECAL_MIN

P, DT, NOISE, DAYS = 288, 300.0, 0.05, 10
N = DAYS * P
FLAT = (7 * P + 20, 7 * P + 124)
SHIFT_AT = 7 * P + 100
T0 = 1_700_000_000.0


def surprise(likelihood: np.ndarray) -> np.ndarray:
    return -np.log10(np.clip(1 - likelihood, 1e-300, None))


@pytest.fixture(scope="module")
def series() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(N)
    day = np.sin(2 * np.pi * t / P)
    base = day + rng.normal(0, NOISE, N)
    a, b = FLAT
    bump = np.zeros(N)
    bump[a:b] = np.sin(np.pi * (t[a:b] - a) / (b - a)) ** 2
    shift = base.copy()
    shift[SHIFT_AT:] += 0.6
    return {"none": base, "flat": base - bump * day, "shift": shift}


def score(values: np.ndarray, config: ScorerConfig | None = None):
    ts = T0 + np.arange(len(values)) * DT
    return StreamScorer.builtin(config=config).step(ReadingBatch(["d"] * len(values), ts, values[:, None]))


def test_contextual_anomaly_needs_the_seasonal_check(series) -> None:
    a, b = FLAT
    on, off = score(series["flat"]), score(series["flat"], ScorerConfig(seasonal_check=False))
    assert on.is_anomaly[a:b].any()
    assert surprise(on.likelihood[a:b]).max() >= 5.0
    assert not off.is_anomaly[a:b].any()
    assert surprise(off.likelihood[a:b]).max() < 3.0


def test_an_anomaly_is_not_remembered_as_the_next_days_normal(series) -> None:
    a, b = FLAT
    res = score(series["flat"])
    assert not res.is_anomaly[b:].any()
    assert surprise(res.likelihood[a + P : b + P]).max() < 3.0


def test_a_level_shift_is_flagged_once_and_absorbed(series) -> None:
    res = score(series["shift"])
    flags = np.flatnonzero(res.is_anomaly[SHIFT_AT - 5 :]) + SHIFT_AT - 5
    assert flags.size >= 1
    assert flags[0] <= SHIFT_AT + 2
    # After it: quiet, including the same hours one day later (the memory holds the new level).
    assert not res.is_anomaly[SHIFT_AT + 60 :].any()
    assert surprise(res.likelihood[SHIFT_AT + 60 :]).max() < 4.0


def test_the_control_stays_quiet(series) -> None:
    res = score(series["none"])
    flagged = np.flatnonzero(res.is_anomaly)
    assert flagged.size == 0, flagged
    assert surprise(res.likelihood[~res.warming_up]).max() < 4.0


def test_attribution_follows_the_seasonal_check(series) -> None:
    """Two channels, the contextual anomaly on channel 1 only: when the seasonal check decides, the
    attribution names channel 1."""
    a, b = FLAT
    values = np.stack([series["none"], series["flat"]], axis=1)
    ts = T0 + np.arange(N) * DT
    res = StreamScorer.builtin(channels=2).step(ReadingBatch(["d"] * N, ts, values))
    hits = np.flatnonzero(res.is_anomaly[a:b]) + a
    assert hits.size > 0
    assert (res.attribution[hits, 1] > 0.8).all(), res.attribution[hits]


def test_the_check_abstains_until_it_has_a_period_of_memory() -> None:
    """A residual of the check exists once the reading's hour one day earlier is remembered and its
    RMS has warm-up residuals (read from the check's own state, one reading at a time)."""
    cfg = ScorerConfig()
    scorer = StreamScorer.builtin(config=cfg)
    need = max(RECAL_MIN, cfg.warmup)
    scored_at = []
    for i in range(2 * P):
        before = scorer.state_of("d")
        scorer.step(ReadingBatch(["d"], [T0 + i * DT], [[float(np.sin(2 * np.pi * i / P))]]))
        after = scorer.state_of("d")
        assert after is not None
        n0 = 0.0 if before is None else float(before["seasonal_check.rms_count"][0])
        n1 = float(after["seasonal_check.rms_count"][0])
        scored_at.append(n1 == n0 + 1 and n0 >= need)  # a remembered bin, and an RMS to divide by
    first = scored_at.index(True)
    # A residual needs the reading's hour one day earlier and warm-up residuals for its scale.
    assert P <= first <= P + cfg.warmup + 12
    assert all(scored_at[first:])


def test_the_checks_likelihood_waits_for_a_period_of_its_own_scores(series) -> None:
    """The same contextual anomaly on day 2 — the check has residuals from reading P + 64 on, but has
    not yet scored a full day — is left to the forecast, which does not see it; on day 8 the check
    flags it (test above)."""
    a, b = FLAT
    bump = series["none"] - series["flat"]  # what the anomaly removes, on [a, b)
    early = series["none"].copy()
    early[a - 6 * P : b - 6 * P] -= bump[a:b]  # the same hours of day 2
    res = score(early)
    assert not res.is_anomaly[a - 6 * P : b - 6 * P].any()


def test_seasonal_memory_is_small_and_its_config_is_checked() -> None:
    layout = StreamScorer.builtin().layout
    store, _, shape, _ = layout.fields["seasonal_check.mean"]
    assert (store, shape) == ("memory32", (25, 1))  # a day of hourly bins plus one
    item = {"state": 8, "memory32": 4, "memory64": 8}
    per_device = sum(
        int(np.prod(shape)) * item[where]
        for name, (where, _, shape, _) in layout.fields.items()
        if name.startswith("seasonal_check.")
    )
    assert per_device < 700  # bytes per univariate device
    with pytest.raises(ValidationError, match="whole number of bins"):
        ScorerConfig(seasonal_bin_s=7000.0)
    off = StreamScorer.builtin(config=ScorerConfig(seasonal_check=False)).layout
    assert not any(name.startswith("seasonal_check.") for name in off.fields)


def test_residuals_are_on_the_devices_own_scale_after_a_level_shift() -> None:
    """A large level shift multiplies the spread of the values (the normaliser's std) for thousands
    of readings; residuals must stay in units of the device's own residual scale, so the same in-range
    dip scores about the same z before and after the shift."""
    rng = np.random.default_rng(0)
    n = 2400
    values = rng.normal(0.0, 1.0, n)
    values[1500:] += 40.0
    # The same step of −3 (about 2.1 residual RMS for a persistence forecast of unit noise), long
    # before the shift and 300 readings after it.
    values[999], values[1000] = 0.0, -3.0
    values[1799], values[1800] = 40.0, 37.0
    res = score(values, ScorerConfig(seasonal_check=False))
    z_before, z_after = abs(res.z[1000, 0]), abs(res.z[1800, 0])
    assert z_before > 1.5, z_before
    assert z_after > 1.5, z_after
    assert 0.7 < z_after / z_before < 1.4, (z_before, z_after)


def test_the_return_from_a_temporary_shift_is_not_a_contextual_anomaly(series) -> None:
    """``seasonal_return``: +0.6 for 60 readings on day 8, then back. The seasonal level absorbs the
    move while it lasts; the reading that comes back is judged against the level the device had
    before it (the slow level), so the return raises no contextual alert — without that rule it
    does, a few readings after the move ends."""
    temporary = series["none"].copy()
    a, b = SHIFT_AT, SHIFT_AT + 60
    temporary[a:b] += 0.6
    after = slice(b + 1, b + 60)  # past the forecast's own reaction to the step back

    def contextual_after(config: ScorerConfig) -> int:
        res = score(temporary, config)
        return int(((res.kind[after] == KINDS.index("contextual")) & res.is_anomaly[after]).sum())

    off = ScorerConfig(spike_z=None, seasonal_return=False)
    on = ScorerConfig(spike_z=None)
    assert contextual_after(off) >= 1
    assert contextual_after(on) == 0
