"""The spike check (issue #12's six-spike sine): an isolated spike far outside the device's own
residuals is an anomaly at its own reading from the end of warm-up on, the reading after it (the
forecaster's echo) is not, a clean series raises nothing, and the likelihood — what NAB scores — is
exactly what it is without the check."""

from __future__ import annotations

import numpy as np
import pytest

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.artifacts import load_default_or_builtin

SPIKES = [100, 150, 250, 400, 700, 1200]
ROWS, NOISE = 1500, 0.2
TS = 1_767_225_600.0 + 1800.0 * np.arange(ROWS)  # 48 readings a day


def sine(seed: int, spike: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 3.0 * np.sin(2 * np.pi * np.arange(ROWS) / 48) + NOISE * rng.standard_normal(ROWS)
    x[SPIKES] += spike * NOISE
    return x


def run(
    x: np.ndarray, config: ScorerConfig | None = None, model: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, as a device streams: (is_anomaly, likelihood)."""
    m, version = load_default_or_builtin(model, None, 1)
    scorer = StreamScorer(m, config or ScorerConfig(), model_version=version)
    flags, lik = np.zeros(ROWS, dtype=bool), np.zeros(ROWS)
    for i in range(ROWS):
        r = scorer.step(ReadingBatch(["d"], TS[i : i + 1], x[i : i + 1, None]))
        flags[i], lik[i] = r.is_anomaly[0], r.likelihood[0]
    return flags, lik


@pytest.mark.parametrize("model", [None, "builtin"])
@pytest.mark.parametrize("size", [30.0, 75.0])
def test_every_spike_is_an_anomaly_at_its_own_reading(size: float, model: str | None) -> None:
    for seed in range(2):
        x = sine(seed, size)
        flags, _ = run(x, model=model)
        assert flags[SPIKES].all(), [s for s in SPIKES if not flags[s]]
        # Nothing else is the check's: every other alert is the likelihood's own (the echo of a spike
        # is not a second one).
        without, _ = run(x, ScorerConfig(spike_z=None), model=model)
        added = set(np.flatnonzero(flags & ~without).tolist()) - set(SPIKES)
        assert not added, sorted(added)


def test_a_clean_series_raises_no_alert_after_warm_up() -> None:
    warmup = ScorerConfig().warmup
    for seed in range(3):
        flags, _ = run(sine(seed))
        assert not flags[warmup:].any(), np.flatnonzero(flags)


def test_the_check_leaves_the_likelihood_alone() -> None:
    """NAB scores the likelihood column: the spike check is the decision's, not the likelihood's."""
    x = sine(0, 75.0)
    flags_on, lik_on = run(x)
    flags_off, lik_off = run(x, ScorerConfig(spike_z=None))
    np.testing.assert_array_equal(lik_on, lik_off)
    assert flags_on[SPIKES].all()
    assert not flags_off[SPIKES].all()  # without it most of them are missed (the finding)


def test_a_spike_during_warm_up_does_not_blunt_the_check() -> None:
    """The check's unit learns from warm-up on, with outliers clipped: a huge spike it cannot flag yet
    (warm-up) does not hide a later one."""
    x = sine(1)
    x[30] += 500 * NOISE
    x[300] += 30 * NOISE
    flags, _ = run(x)
    assert not flags[30]  # warming up: nothing is an anomaly
    assert flags[300]


def test_a_level_shift_is_one_spike_at_its_onset() -> None:
    x = sine(2)
    x[600:] += 30 * NOISE
    flags, _ = run(x, ScorerConfig(range_margin=None))
    assert flags[600]
    assert flags[601:640].sum() <= 3, np.flatnonzero(flags[601:640]) + 601


def test_an_anomaly_says_which_check_made_it() -> None:
    """``kind``: out_of_range before spike before stuck (the most specific first); records name it
    and carry the observed value."""
    from sensorwatch.scoring.batch import KINDS
    from service.payloads import anomaly_event

    x = sine(3)
    x[420] += 30 * NOISE  # at a trough: inside the range seen, far outside the residuals
    x[900] += 100 * NOISE  # at a peak: beyond the range seen (and a spike)
    x[1000:1060] = x[1000]  # stuck
    m, version = load_default_or_builtin(None, None, 1)
    scorer = StreamScorer(m, ScorerConfig(), model_version=version)
    res = scorer.step(ReadingBatch(["d"] * ROWS, TS, x[:, None]))
    kinds = [KINDS[k] for k in res.kind]
    assert kinds[420] == "spike"
    assert kinds[900] == "out_of_range"
    assert "stuck" in kinds[1000:1060]
    assert all(k is None for k, a in zip(kinds, res.is_anomaly, strict=True) if not a)
    assert all(k is not None for k, a in zip(kinds, res.is_anomaly, strict=True) if a)
    assert res.records() == [res.record(i) for i in range(len(res))]  # anomalies of every kind
    event = anomaly_event(res.record(420))
    assert event["kind"] == "spike"
    assert event["value"] == {m.config.names[0]: float(x[420])}
    assert event["predicted"][m.config.names[0]] != event["value"][m.config.names[0]]


def test_a_stuck_run_is_one_episode_with_an_end() -> None:
    """Every reading of a stuck run is an anomaly, but only the first starts an event (the rest
    ``continues``) and the first reading after it says the episode ended."""
    from sensorwatch.scoring.batch import KINDS
    from service.payloads import episode_end_event, records_to_publish

    x = sine(4)
    x[1000:1060] = x[1000]
    m, version = load_default_or_builtin(None, None, 1)
    res = StreamScorer(m, ScorerConfig(), model_version=version).step(
        ReadingBatch(["d"] * ROWS, TS, x[:, None])
    )
    run = np.flatnonzero(res.is_anomaly[1000:1060]) + 1000
    assert len(run) > 10
    assert [KINDS[k] for k in res.kind[run]] == ["stuck"] * len(run)
    starts = run[~res.continues[run]]
    assert starts.tolist() == [run[0]]  # one event for the run
    assert KINDS[res.ended[1060]] == "stuck"
    assert (res.ended[:1060] == 0).all()
    published = {r["index"]: r for r in records_to_publish(res, 0, ROWS, every=False)}
    assert 1060 in published  # the end is published although the reading is not an anomaly
    end = episode_end_event(published[1060])
    assert (end["kind"], end["episode"], end["ts"]) == ("stuck", "end", TS[1060])


def test_an_out_of_range_stretch_that_flickers_is_one_episode() -> None:
    """A drift past the range's top widens the range as it goes, so its readings fall in and out of
    the margin; readings back inside for up to ``RANGE_GAP`` keep the stretch open (one event), and
    its end comes at the first reading after the gap. The episode component, reading by reading."""
    from sensorwatch.scoring.components import episode
    from sensorwatch.scoring.components.decision import OUT_OF_RANGE, SPIKE

    gap = int(episode.RANGE_GAP)
    o = np.zeros(1, dtype=episode.Offsets)[0]
    for i, f in enumerate(episode.STATE):
        o[f.name] = i
    row = np.array([f.init for f in episode.STATE], dtype=np.float64)
    kinds = [0, OUT_OF_RANGE, 0, 0, OUT_OF_RANGE, OUT_OF_RANGE, SPIKE] + [0] * (gap - 1) + [OUT_OF_RANGE]
    kinds += [0] * (gap + 1) + [OUT_OF_RANGE]
    got = [episode.track(row, o, k) for k in kinds]
    continues = [c for (c, _), k in zip(got, kinds, strict=True) if k == OUT_OF_RANGE]
    assert continues == [False, True, True, True, False]  # the last: after more than the gap
    ended = [i for i, (_, e) in enumerate(got) if e]
    assert ended == [len(kinds) - 2]  # the first stretch's end: gap + 1 readings after its last
    assert got[ended[0]][1] == OUT_OF_RANGE


def test_the_range_check_arms_only_once_the_range_is_wider_than_the_noise() -> None:
    """``make run``'s devices at 2 readings/s: 1,400 readings (12 minutes) see a sliver of the daily
    cycle, a range no wider than the noise's own extremes, and a value outside it is not out of
    range (it is a spike). A range that spans the device's cycle (``range_span`` robust σ of the
    forecast's residuals, here ~19) arms the check."""
    from sensorwatch.scoring.batch import KINDS

    rng = np.random.default_rng(5)
    minutes = 20.0 + 3e-4 * np.arange(ROWS) + NOISE * rng.standard_normal(ROWS)  # drifts 2σ in 1,400
    cycle = sine(5)
    for x in (minutes, cycle):
        x[1400] += 100 * NOISE
    fast = 1_767_225_600.0 + 0.5 * np.arange(ROWS)
    m, version = load_default_or_builtin(None, None, 1)
    kinds = {}
    for name, x, cfg in (
        ("noise", minutes, ScorerConfig()),
        ("cycle", cycle, ScorerConfig()),
        ("noise, no span asked", minutes, ScorerConfig(range_span=None)),
    ):
        res = StreamScorer(m, cfg, model_version=version).step(ReadingBatch(["d"] * ROWS, fast, x[:, None]))
        kinds[name] = KINDS[res.kind[1400]]
    assert kinds == {
        "noise": "spike",
        "cycle": "out_of_range",
        "noise, no span asked": "out_of_range",
    }


def test_a_burst_of_spikes_is_one_event() -> None:
    x = sine(6)
    x[[800, 804, 808]] += 30 * NOISE  # three spikes four readings apart: one burst
    x[1100] += 30 * NOISE  # and one on its own, far later
    m, version = load_default_or_builtin(None, None, 1)
    res = StreamScorer(m, ScorerConfig(), model_version=version).step(
        ReadingBatch(["d"] * ROWS, TS, x[:, None])
    )
    assert res.is_anomaly[[800, 804, 808, 1100]].all()
    assert res.continues[[800, 804, 808, 1100]].tolist() == [False, True, True, False]


def test_severity_ranks_the_evidence() -> None:
    """A +75σ spike (≥ 10σ off its forecast) is critical, a +30σ one at least high, a stuck run high;
    every anomaly has a severity, nothing else has one, and the record and the event carry it."""
    from sensorwatch.scoring.batch import SEVERITIES
    from service.payloads import anomaly_event

    x = sine(7)
    x[420] += 75 * NOISE
    x[1000:1060] = x[1000]
    m, version = load_default_or_builtin(None, None, 1)
    res = StreamScorer(m, ScorerConfig(), model_version=version).step(
        ReadingBatch(["d"] * ROWS, TS, x[:, None])
    )
    names = [SEVERITIES[s] for s in res.severity]
    assert names[420] == "critical"
    stuck = np.flatnonzero(res.is_anomaly[1000:1060]) + 1000
    assert len(stuck) > 10
    assert {names[i] for i in stuck} <= {"high", "critical"}
    assert all((s is None) == (not a) for s, a in zip(names, res.is_anomaly, strict=True))
    assert anomaly_event(res.record(420))["severity"] == "critical"
    assert res.record(10)["severity"] is None


def student_t(seed: int, dof: float, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(dof, rows)


def test_heavy_tailed_residuals_widen_the_unit_gaussian_ones_do_not() -> None:
    """The unit is the larger of the bulk (mean |residual|) and the tracked 0.99 quantile over a
    Gaussian's, times a multiplier held to a false-hit budget: on Student-t(2) noise, whose tails the
    bulk underrates, the check's false hits drop against the bulk unit alone; on Gaussian noise the
    units agree and the multiplier stays near 1, so +10σ spikes every 500 readings are all caught."""
    n = 6000
    cfg = ScorerConfig(range_margin=None, stuck_check=False, seasonal_check=False)
    ts = 1_767_225_600.0 + 60.0 * np.arange(n)
    m, version = load_default_or_builtin("builtin", None, 1)

    def hits(x: np.ndarray) -> np.ndarray:
        res = StreamScorer(m, cfg, model_version=version).step(ReadingBatch(["d"] * n, ts, x[:, None]))
        return res.is_anomaly & (res.kind == 3)

    heavy = np.cumsum(student_t(1, 2.0, n))  # persistence residuals: the t-distributed steps
    with_tail = int(hits(heavy)[500:].sum())
    # The bulk unit alone (clipped mean |step| of the first 500, as the check learns it), offline:
    steps = np.abs(np.diff(heavy))
    first = steps[:500]
    bulk = np.sqrt(np.pi / 2) * np.mean(np.minimum(first, 4 * np.mean(first)))
    bulk_only = int((steps[500:] >= 5.0 * bulk).sum())
    assert with_tail * 4 < bulk_only, (with_tail, bulk_only)  # measured 13 against 120
    gauss = np.cumsum(np.random.default_rng(2).standard_normal(n))
    spikes = np.arange(1000, n, 500)
    gauss[spikes] += 10.0
    flagged = hits(gauss)
    assert flagged[spikes].all(), spikes[~flagged[spikes]]


def test_a_spike_is_attributed_to_its_channel() -> None:
    """A spike hit's attribution is each channel's residual in its own spike unit (squared shares,
    summing to 1): the channel that spiked ranks first with nearly all of it."""
    rng = np.random.default_rng(8)
    n = 1500
    x = np.column_stack([np.sin(np.arange(n) / 8 + k) * (1 + k) for k in range(3)])
    x += 0.05 * rng.standard_normal((n, 3))
    x[900, 2] += 3.0  # channel 2 only
    m, version = load_default_or_builtin("builtin", None, 3)
    ts = 1_767_225_600.0 + 60.0 * np.arange(n)
    res = StreamScorer(m, ScorerConfig(range_margin=None), model_version=version).step(
        ReadingBatch(["d"] * n, ts, x)
    )
    assert res.is_anomaly[900]
    assert int(np.argmax(res.attribution[900])) == 2
    assert res.attribution[900, 2] > 0.9
    assert res.attribution[900].sum() == pytest.approx(1.0)
