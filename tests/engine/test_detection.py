"""End-to-end detection with the built-in (persistence) model and default configs.

A daily-ish seasonal series (sine of period 288 readings, amplitude 1, Gaussian noise σ = 0.07,
4000 readings 300 s apart) gets one injected anomaly at reading 3000, one series per type:

* ``spike``: +1.5 on one reading;
* ``level_shift``: +1.0 from reading 3000 on;
* ``stuck``: the value frozen for 50 readings (3000…3049);
* ``level_shift_in_range``: −1.0 from reading 3000 on, where the sine is at +0.5, so the shifted
  values stay inside the range seen so far for 38 readings: neither the range check nor the
  10-reading short-term likelihood of the one-step forecast catches it promptly. The seasonal check
  (on by default: the reading against the same hour one day earlier) does, and so does the opt-in
  per-reading point likelihood (off by default: it floods heavy-tailed real series with alerts —
  README, NAB). The ``threshold`` calibrator decides on the forecast's smoothed score alone.

All series share the same noise draw, so the series without an anomaly is the exact negative
control of each. The five series are scored as five devices of one scorer (one batched step per
500 timestamps), once per config: default likelihood, the ``threshold`` calibrator, and the
likelihood with ``point_likelihood=True``.

"Normal readings" are those after warm-up (``warming_up`` False) and before the injection; the
"injected region" is the injected reading(s) plus the 5 readings after.

Measured (seed 0), as surprise S = −log10(1 − likelihood):

* normal readings: max S 3.97, 99th percentile 2.56 (without the seasonal check 3.79 and 1.99);
* injected region: S = ∞ (likelihood exactly 1) for the spike and the level shift (range check);
  6.35 for the stuck sensor — Numenta's alert filter keeps the first red reading (S ≥ 5) of a run
  and lowers the rest below 3, so an escalating run peaks at its first red reading; the in-range
  shift 7.57 by default (2.43 without the seasonal check), 11.2 with the point likelihood;
* is_anomaly in the region: spike 4/6 (threshold calibrator 3/6, point 3/6), shift 1/6, stuck 48/55
  (the flag stays on through a stuck run even where the filter lowered the likelihood), in-range
  shift 1/6 (threshold calibrator 0/6);
* negative control, readings after warm-up flagged: 4 of 3936 (likelihood, with or without the point
  likelihood; 4 without the seasonal check), 12 (threshold calibrator).

The assertions keep margins: injected S ≥ 6, normal max S < 5 (the red level), p99 S < 3.
"""

from __future__ import annotations

import numpy as np
import pytest

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer

N, PERIOD, DT, NOISE, SEED = 4000, 288, 300.0, 0.07, 0
ONSET = 3000
AFTER = 5  # readings after the injection that still count as "the injected region"
STUCK_LEN = 50
KINDS = ("spike", "level_shift", "stuck")

INJECTED_MIN = 1 - 1e-6  # injected region: max likelihood at least this (the filter keeps only
#: the first red reading of a run, so an escalating run such as a stuck sensor peaks early)
NORMAL_MAX = 1 - 1e-5  # normal readings: max likelihood below the red level
NORMAL_P99 = 0.999  # normal readings: 99th percentile below this
#: Negative control: most readings (after warm-up) of the anomaly-free series flagged.
MAX_FALSE_FLAGS = {"likelihood": 20, "threshold": 120, "likelihood+point": 20}  # measured 4, 12, 4 of 3936


def make_series() -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Timestamps, values per kind (incl. ``none``) and the injected region per kind."""
    rng = np.random.default_rng(SEED)
    t = np.arange(N)
    base = np.sin(2 * np.pi * t / PERIOD) + rng.normal(0.0, NOISE, N)
    values = {"none": base.copy()}
    region = {}
    values["spike"] = base.copy()
    values["spike"][ONSET] += 1.5
    region["spike"] = np.arange(ONSET, ONSET + 1 + AFTER)
    values["level_shift"] = base.copy()
    values["level_shift"][ONSET:] += 1.0
    region["level_shift"] = np.arange(ONSET, ONSET + 1 + AFTER)
    values["level_shift_in_range"] = base.copy()
    values["level_shift_in_range"][ONSET:] -= 1.0  # from +0.5 to −0.5: inside the range seen so far
    region["level_shift_in_range"] = np.arange(ONSET, ONSET + 1 + AFTER)
    values["stuck"] = base.copy()
    values["stuck"][ONSET : ONSET + STUCK_LEN] = base[ONSET]
    region["stuck"] = np.arange(ONSET, ONSET + STUCK_LEN + AFTER)
    return 1_700_000_000.0 + t * DT, values, region


@pytest.fixture(scope="module")
def series() -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    return make_series()


CONFIGS = {
    "likelihood": ScorerConfig(),
    "threshold": ScorerConfig(calibrator="threshold"),
    "likelihood+point": ScorerConfig(point_likelihood=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def scored(request, series) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
    """Per kind: likelihood, is_anomaly and warming_up arrays (N,), for one calibrator."""
    calibrator = request.param
    ts, values, _ = series
    kinds = list(values)
    config = CONFIGS[calibrator]
    scorer = StreamScorer.builtin(config=config)
    cols: dict[str, dict[str, list[np.ndarray]]] = {k: {"lik": [], "flag": [], "warm": []} for k in kinds}
    chunk = 500
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        n = stop - start
        # Interleave the devices reading by reading (row r·K + j is device j's r-th reading).
        ids = kinds * n
        batch_ts = np.repeat(ts[start:stop], len(kinds))
        batch_values = np.stack([values[k][start:stop] for k in kinds], axis=1).reshape(-1, 1)
        res = scorer.step(ReadingBatch(ids, batch_ts, batch_values))
        assert res.accepted.all()
        for j, k in enumerate(kinds):
            cols[k]["lik"].append(res.likelihood[j :: len(kinds)])
            cols[k]["flag"].append(res.is_anomaly[j :: len(kinds)])
            cols[k]["warm"].append(res.warming_up[j :: len(kinds)])
    out = {k: {name: np.concatenate(parts) for name, parts in c.items()} for k, c in cols.items()}
    return calibrator, out


def normal_mask(warm: np.ndarray) -> np.ndarray:
    mask = ~warm
    mask[ONSET:] = False
    return mask


@pytest.mark.parametrize("kind", [*KINDS, "level_shift_in_range"])
def test_injected_anomaly_stands_out(scored, series, kind: str) -> None:
    calibrator, out = scored
    if kind == "level_shift_in_range" and calibrator == "threshold":
        pytest.skip("the threshold calibrator decides on the forecast alone (module docstring)")
    _, _, regions = series
    lik, flag, warm = out[kind]["lik"], out[kind]["flag"], out[kind]["warm"]
    region = regions[kind]
    normal = normal_mask(warm)
    assert normal.sum() > 2500
    injected_max = float(lik[region].max())
    normal_max = float(lik[normal].max())
    normal_p99 = float(np.quantile(lik[normal], 0.99))
    context = (
        f"[{calibrator}] {kind}: injected max {injected_max!r}, normal max {normal_max!r}, "
        f"normal p99 {normal_p99!r}, flagged in region {int(flag[region].sum())}/{region.size}"
    )
    assert injected_max >= INJECTED_MIN, context
    assert normal_max < NORMAL_MAX, context
    assert injected_max > normal_max, context
    assert normal_p99 < NORMAL_P99, context
    # The decision flags the injected region, and promptly.
    flagged = np.flatnonzero(flag[region])
    assert flagged.size > 0, f"{context}: {kind} not flagged"
    assert flagged[0] <= 2, f"{context}: {kind} flagged late (reading {flagged[0]} of the region)"
    if kind == "stuck":
        frozen = np.arange(ONSET + 2, ONSET + STUCK_LEN)  # a run of 2 equal values is the first evidence
        assert flag[frozen].mean() >= 0.9, f"{context}: stuck sensor flagged only part of the time"


def test_negative_control_flags_few_readings(scored) -> None:
    calibrator, out = scored
    flag, warm = out["none"]["flag"], out["none"]["warm"]
    assert not flag[warm].any()  # never during warm-up
    flagged = int(flag[~warm].sum())
    assert flagged <= MAX_FALSE_FLAGS[calibrator], (
        f"[{calibrator}] {flagged} false alarms in {int((~warm).sum())}"
    )


def test_series_before_the_injection_are_scored_identically(scored) -> None:
    """All devices see the same data before the injection, so they score the same (a sanity check
    that the four devices of one batch do not interfere)."""
    _, out = scored
    for kind in [*KINDS, "level_shift_in_range"]:
        np.testing.assert_array_equal(out[kind]["lik"][:ONSET], out["none"]["lik"][:ONSET])
        np.testing.assert_array_equal(out[kind]["flag"][:ONSET], out["none"]["flag"][:ONSET])


def test_in_range_shift_needs_the_seasonal_check(series) -> None:
    """The control for the in-range shift: without the seasonal check (and without the point
    likelihood, the spike check, which flags the shift's first reading, and online adaptation, whose
    sharper forecast makes the shift's residuals surprising) the likelihood does not flag it in the
    region."""
    ts, values, regions = series
    scorer = StreamScorer.builtin(config=ScorerConfig(seasonal_check=False, spike_z=None, adapt_lags=None))
    res = scorer.step(ReadingBatch(["d"] * N, ts, values["level_shift_in_range"][:, None]))
    region = regions["level_shift_in_range"]
    assert not res.is_anomaly[region].any()
    assert res.likelihood[region].max() < 1 - 1e-4
