"""NAB scoring: hand-computed cases, a brute-force cross-check and reproduction of published results."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from sensorwatch.evaluation import (
    PROFILES,
    NabFile,
    event_metrics,
    load_corpus,
    load_reference_scores,
    probation_length,
    score_all_profiles,
    score_at_threshold,
    score_corpus,
)

NAB_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nab-dev"

# Published NAB scores of reference detectors on the nab-dev split (its README).
REFERENCE = {
    "numenta": {"standard": 64.854, "reward_low_FP_rate": 59.119, "reward_low_FN_rate": 69.848},
    "ARTime": {"standard": 68.769, "reward_low_FP_rate": 60.042, "reward_low_FN_rate": 74.051},
}


def S(y: float) -> float:
    """The scaled sigmoid written independently: 2/(1+e^(5y)) − 1 = −tanh(2.5·y), and −1 beyond y = 3."""
    return -1.0 if y > 3 else -math.tanh(2.5 * y)


def spikes(n: int, at: dict[int, float]) -> np.ndarray:
    s = np.zeros(n)
    for i, v in at.items():
        s[i] = v
    return s


# A 200-row file (probation 30) with one 10-row window on rows 100–109: 70 scorable rows before it, so
# "flag everything" (threshold 0) is always a bad choice.
N, L, R = 200, 100, 109
W = R - L + 1


def one_window(relpath: str = "cat/a.csv") -> NabFile:
    return NabFile.synthetic(N, [(L, R)], relpath=relpath)


# ---------------------------------------------------------------------------------------------- basics


def test_probation_length() -> None:
    assert probation_length(N) == 30
    assert probation_length(4032) == 604  # floor(0.15 · 4032) = floor(604.8)
    assert probation_length(5000) == 750
    assert probation_length(22695) == 750  # capped


def test_perfect_detector_scores_100() -> None:
    files = [one_window("cat/a.csv"), NabFile.synthetic(120, [(40, 49), (80, 99)], relpath="cat/b.csv")]
    scores = {"cat/a.csv": spikes(N, {L: 1.0}), "cat/b.csv": spikes(120, {40: 1.0, 80: 1.0})}
    for name, (a_tp, _, a_fn) in PROFILES.items():
        res = score_corpus(files, scores, name)
        assert res.raw == pytest.approx(3 * a_tp)
        assert res.normalized == pytest.approx(100.0)
        assert (res.tp, res.fp, res.fn, res.windows) == (3, 0, 0, 3)
        assert res.null == -3 * a_fn
        assert res.perfect == 3 * a_tp
        assert res.threshold == 1.0


def test_detecting_nothing_scores_0() -> None:
    f = one_window()
    res = score_corpus([f], {f.relpath: np.zeros(N)}, "standard")
    # Threshold 0 would flag every row (70 FPs before the window alone cost 7.7), so 1.1 wins.
    assert res.threshold == 1.1
    assert res.raw == pytest.approx(-1.0)
    assert res.normalized == pytest.approx(0.0)
    assert (res.tp, res.fp, res.fn) == (0, 0, 1)
    assert score_at_threshold([f], {f.relpath: np.zeros(N)}, "standard", 1.1).normalized == 0.0


def test_detection_at_window_end_is_worth_S_of_minus_one_over_w() -> None:
    f = one_window()
    res = score_corpus([f], {f.relpath: spikes(N, {R: 0.7})}, "standard")
    # y = −(r − i + 1)/w = −1/10 at i = r: value = S(−0.1)/S(−1) = tanh(0.25)/tanh(2.5) ≈ 0.24824.
    expected = S(-1 / W) / S(-1)
    assert expected == pytest.approx(math.tanh(0.25) / math.tanh(2.5))
    assert expected == pytest.approx(0.248242, abs=1e-6)
    assert res.raw == pytest.approx(expected)
    assert res.normalized == pytest.approx(100 * (expected + 1) / 2)
    assert res.threshold == 0.7


def test_window_counts_only_its_earliest_detection() -> None:
    f = one_window()
    mid = L + 4  # y = −(109 − 104 + 1)/10 = −0.6
    res = score_corpus([f], {f.relpath: spikes(N, {mid: 0.9, R: 0.95})}, "standard")
    assert res.raw == pytest.approx(S(-0.6) / S(-1))
    assert res.threshold == 0.9
    assert res.tp == 1


def test_false_positive_before_first_window_costs_A_FP() -> None:
    f = one_window()
    scores = {f.relpath: spikes(N, {50: 0.95, L: 0.9})}
    # 1.1 → −1; 0.95 → −0.11 − 1; 0.9 → −0.11 + 1.
    res = score_corpus([f], scores, "standard")
    assert res.raw == pytest.approx(1 - 0.11)
    assert (res.threshold, res.tp, res.fp, res.fn) == (0.9, 1, 1, 0)
    assert score_at_threshold([f], scores, "reward_low_FP_rate", 0.9).raw == pytest.approx(1 - 0.22)


@pytest.mark.parametrize("k", [1, 2, 5, 9, 27, 28])
def test_false_positive_after_window_decays_via_sigmoid(k: int) -> None:
    f = one_window()
    scores = {f.relpath: spikes(N, {L: 1.0, R + k: 1.0})}
    res = score_at_threshold([f], scores, "standard", 1.0)
    # y = (i − r*)/(w* − 1) = k/9; beyond y = 3 (k ≥ 28) the cost is the full −A_FP.
    fp_value = 0.11 * S(k / (W - 1))
    assert res.raw == pytest.approx(1.0 + fp_value)
    if k == 1:
        assert fp_value == pytest.approx(-0.11 * math.tanh(2.5 / 9))  # ≈ −0.0298: cheap right after
    if k == 28:
        assert fp_value == -0.11


def test_false_positive_uses_most_recent_window_that_ended() -> None:
    # Windows 40–49 (w 10) and 60–63 (w 4); row 55 follows the first, row 66 the second.
    f = NabFile.synthetic(100, [(40, 49), (60, 63)])
    scores = {f.relpath: spikes(100, {40: 1.0, 60: 1.0, 55: 1.0, 66: 1.0})}
    res = score_at_threshold([f], scores, "standard", 1.0)
    assert res.raw == pytest.approx(2.0 + 0.11 * S((55 - 49) / 9) + 0.11 * S((66 - 63) / 3))
    assert res.fp == 2


def test_one_row_window_does_not_divide_by_zero() -> None:
    f = NabFile.synthetic(100, [(50, 50)])
    res = score_at_threshold([f], {f.relpath: spikes(100, {50: 1.0, 51: 1.0})}, "standard", 1.0)
    assert res.raw == pytest.approx(1.0 + 0.11 * S(1.0))  # w* − 1 taken as 1


def test_probation_rows_are_ignored() -> None:
    f = one_window()
    base = spikes(N, {L: 0.5})
    noisy = base.copy()
    noisy[:30] = 1.0  # every probation row flagged with the highest score
    clean_res = score_corpus([f], {f.relpath: base}, "standard")
    noisy_res = score_corpus([f], {f.relpath: noisy}, "standard")
    assert noisy_res.raw == clean_res.raw == pytest.approx(1.0)
    assert noisy_res.threshold == 0.5
    assert noisy_res.fp == 0
    # Non-finite scores during probation are ignored as well.
    noisy[:30] = np.nan
    assert score_corpus([f], {f.relpath: noisy}, "standard").raw == pytest.approx(1.0)


def test_window_overlapping_probation() -> None:
    # 100 rows → probation 15. Window 10–19 (w 10) starts inside probation; 2–8 lies wholly inside it.
    f = NabFile.synthetic(100, [(2, 8), (10, 19)])
    res = score_at_threshold([f], {f.relpath: spikes(100, {3: 1.0, 10: 1.0, 15: 1.0})}, "standard", 1.0)
    assert res.windows == 1  # the window inside probation can be neither detected nor missed
    assert res.raw == pytest.approx(S(-(19 - 15 + 1) / 10) / S(-1))  # row 10 is in probation
    assert res.normalized == pytest.approx(100 * (res.raw + 1) / 2)
    missed = score_at_threshold([f], {f.relpath: np.zeros(100)}, "standard", 1.1)
    assert (missed.raw, missed.fn) == (-1.0, 1)
    # A FP after a window that lies wholly inside probation is still scored relative to it.
    g = NabFile.synthetic(100, [(2, 8), (40, 49)])
    fp = score_at_threshold([g], {g.relpath: spikes(100, {20: 1.0, 40: 1.0})}, "standard", 1.0)
    assert fp.raw == pytest.approx(1.0 + 0.11 * S((20 - 8) / (7 - 1)))  # r* = 8, w* = 7


def test_threshold_ties_go_to_the_higher_threshold() -> None:
    f = one_window()
    # The later detection (0.8) adds nothing: thresholds 0.9 and 0.8 score exactly the same.
    res = score_corpus([f], {f.relpath: spikes(N, {L: 0.9, L + 1: 0.8})}, "standard")
    assert res.threshold == 0.9
    assert res.raw == pytest.approx(1.0)
    # A tie between 1.1 (nothing) and a real threshold: one FP before the window costs exactly what
    # finding the window at its last row gains over missing it (A_FP = value + A_FN).
    g = NabFile.synthetic(N, [(L, L + 1)])
    value = score_at_threshold([g], {g.relpath: spikes(N, {L + 1: 1.0})}, "standard", 1.0).raw
    assert value == pytest.approx(S(-0.5) / S(-1))
    tie = score_corpus([g], {g.relpath: spikes(N, {50: 0.6, L + 1: 0.6})}, (1.0, value + 1.0, 1.0))
    assert tie.threshold == 1.1
    assert tie.raw == -1.0
    assert score_at_threshold(
        [g], {g.relpath: spikes(N, {50: 0.6, L + 1: 0.6})}, (1.0, value + 1.0, 1.0), 0.6
    ).raw == pytest.approx(-1.0)


def test_profiles_differ_as_expected() -> None:
    files = [one_window("cat/a.csv"), one_window("cat/b.csv")]
    # a.csv: FP before the window (0.9), window found at its first row (0.8); b.csv: window missed.
    scores = {"cat/a.csv": spikes(N, {50: 0.9, L: 0.8}), "cat/b.csv": np.zeros(N)}
    res = score_all_profiles(files, scores)
    assert set(res) == set(PROFILES)
    for r in res.values():
        assert (r.threshold, r.tp, r.fp, r.fn) == (0.8, 1, 1, 1)
    assert res["standard"].raw == pytest.approx(-0.11 + 1 - 1)
    assert res["standard"].normalized == pytest.approx(100 * (-0.11 + 2) / 4)  # 47.25
    assert res["reward_low_FP_rate"].raw == pytest.approx(-0.22)
    assert res["reward_low_FP_rate"].normalized == pytest.approx(100 * 1.78 / 4)  # 44.5
    assert res["reward_low_FN_rate"].raw == pytest.approx(-0.11 + 1 - 2)
    assert res["reward_low_FN_rate"].normalized == pytest.approx(100 * 2.89 / 6)  # 48.17
    for name, r in res.items():
        assert r.normalized == pytest.approx(score_corpus(files, scores, name).normalized)


def test_fp_averse_profile_picks_a_higher_threshold() -> None:
    f = one_window()
    # Ten FPs before the window at 0.6, the window's first row at 0.5.
    # standard: 1 − 10·0.11 = −0.1 > −1 → 0.5; reward_low_FP_rate: 1 − 2.2 = −1.2 < −1 → 1.1.
    scores = {f.relpath: spikes(N, {**{40 + j: 0.6 for j in range(10)}, L: 0.5})}
    res = score_all_profiles([f], scores)
    assert res["standard"].threshold == 0.5
    assert res["standard"].raw == pytest.approx(-0.1)
    assert res["reward_low_FP_rate"].threshold == 1.1
    assert res["reward_low_FP_rate"].raw == -1.0


def test_input_validation() -> None:
    f = one_window()
    with pytest.raises(KeyError):
        score_corpus([f], {}, "standard")
    with pytest.raises(ValueError, match="scores for"):
        score_corpus([f], {f.relpath: np.zeros(N - 1)}, "standard")
    with pytest.raises(ValueError, match="unknown profile"):
        score_corpus([f], {f.relpath: np.zeros(N)}, "nope")
    with pytest.raises(ValueError, match="non-finite"):
        score_corpus([f], {f.relpath: np.full(N, np.nan)}, "standard")
    with pytest.raises(ValueError, match="windows must be"):
        NabFile.synthetic(10, [(5, 3)])
    with pytest.raises(ValueError, match="windows must be"):
        NabFile.synthetic(10, [(2, 5), (5, 7)])


# ---------------------------------------------------------------------------------------------- brute force


def naive_best(
    files: Sequence[NabFile], scores: dict[str, np.ndarray], prof: tuple[float, float, float]
) -> tuple[float, float]:
    """The README's definition executed literally (row loops, every threshold): (threshold, raw)."""
    a_tp, a_fp, a_fn = prof

    def value(f: NabFile, i: int) -> float:
        for lo, hi in f.windows:
            if lo <= i <= hi:
                return a_tp * S(-(hi - i + 1) / (hi - lo + 1)) / S(-1)
        ended = [(lo, hi) for lo, hi in f.windows if hi < i]
        if not ended:
            return -a_fp
        lo, hi = ended[-1]
        return a_fp * S((i - hi) / max(hi - lo, 1))

    def raw(th: float) -> float:
        total = 0.0
        for f in files:
            p = min(math.floor(0.15 * f.n), 750)
            det = [i for i in range(p, f.n) if scores[f.relpath][i] >= th]
            for lo, hi in f.windows:
                if hi < p:
                    continue
                hits = [i for i in det if lo <= i <= hi]
                total += value(f, hits[0]) if hits else -a_fn
            total += sum(value(f, i) for i in det if not any(lo <= i <= hi for lo, hi in f.windows))
        return total

    cands = sorted({float(v) for f in files for v in scores[f.relpath][probation_length(f.n) :]} | {1.1})
    best_th, best = 1.1, -math.inf
    for th in reversed(cands):  # descending: strict > keeps the higher threshold on ties
        r = raw(th)
        if r > best:
            best_th, best = th, r
    return best_th, best


def random_corpus(rng: np.random.Generator) -> tuple[list[NabFile], dict[str, np.ndarray]]:
    files, scores = [], {}
    for k in range(int(rng.integers(1, 4))):
        n = int(rng.integers(20, 90))
        windows, pos = [], int(rng.integers(0, 15))
        while True:
            lo = pos + int(rng.integers(0, 20))
            hi = lo + int(rng.integers(0, 12))
            if hi >= n:
                break
            windows.append((lo, hi))
            pos = hi + 1
        f = NabFile.synthetic(n, windows, relpath=f"r/{k}.csv")
        files.append(f)
        scores[f.relpath] = rng.integers(0, 8, size=n) / 7  # coarse scores: many ties
    return files, scores


def test_sweep_matches_brute_force_on_random_corpora() -> None:
    rng = np.random.default_rng(12345)
    for _ in range(60):
        files, scores = random_corpus(rng)
        for name, prof in PROFILES.items():
            th, raw = naive_best(files, scores, prof)
            res = score_corpus(files, scores, name)
            assert res.raw == pytest.approx(raw, abs=1e-9)
            assert res.threshold == th
            assert sum(res.per_file.values()) == pytest.approx(raw, abs=1e-9)


# ---------------------------------------------------------------------------------------------- events


def test_event_metrics() -> None:
    f = NabFile.synthetic(100, [(40, 49), (70, 79)], step_s=60.0)  # probation 15
    flagged = {5: 1.0, 20: 1.0, 21: 1.0, 22: 1.0, 30: 1.0, 44: 1.0, 46: 1.0, 50: 1.0, 51: 1.0, 85: 0.2}
    m = event_metrics([f], {f.relpath: spikes(100, flagged)}, 0.5)
    # Row 5 is in probation; runs 20–22, 30 and 50–51 are three FP events (six rows); window 1 is found
    # four rows in, window 2 is missed; row 85 is below the threshold.
    assert (m["windows"], m["detected"], m["missed"], m["fp_events"], m["fp_rows"]) == (2, 1, 1, 3, 6)
    assert m["precision"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert (m["mean_delay_rows"], m["mean_delay_s"]) == (4.0, 240.0)
    # A run of flagged rows that touches a window is split by it; nothing flagged → zeros and NaN delays.
    m = event_metrics([f], {f.relpath: spikes(100, {38: 1.0, 39: 1.0, 40: 1.0, 50: 1.0})}, 0.5)
    assert (m["detected"], m["fp_events"], m["mean_delay_rows"]) == (1, 2, 0.0)
    m = event_metrics([f], {f.relpath: np.zeros(100)}, 0.5)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["mean_delay_rows"])
    assert math.isnan(m["mean_delay_s"])


# ---------------------------------------------------------------------------------------------- files


def test_loading_a_corpus_from_files(tmp_path: Path) -> None:
    (tmp_path / "data" / "cat").mkdir(parents=True)
    rows = [f"2020-01-01 00:{m:02d}:00,{m}.5" for m in range(30)]
    rows[20] = "2020-01-01 00:19:00,20.5"  # a repeated timestamp, as in real NAB files
    (tmp_path / "data" / "cat" / "a.csv").write_text("timestamp,value\n" + "\n".join(rows))
    labels = {"cat/a.csv": [["2020-01-01 00:05:00.000000", "2020-01-01 00:09:30.000000"]]}
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    ref = tmp_path / "reference-results" / "det" / "cat"
    ref.mkdir(parents=True)
    lines = [f"{r.split(',')[0]},{r.split(',')[1]},{i / 30}" for i, r in enumerate(rows)]
    (ref / "det_a.csv").write_text("timestamp,value,anomaly_score\r\n" + "\r\n".join(lines) + "\r\n")

    (f,) = load_corpus(tmp_path)
    assert f.relpath == "cat/a.csv"
    assert f.n == 30
    assert f.timestamps[0] == "2020-01-01 00:00:00"
    assert f.ts[1] - f.ts[0] == 60.0
    assert f.ts[0] == 1577836800.0  # naive timestamps are UTC
    assert f.values[3] == 3.5
    assert f.windows == [(5, 9)]  # rows with timestamps in [00:05, 00:09:30], inclusive
    scores = load_reference_scores(tmp_path, "det")
    assert list(scores) == ["cat/a.csv"]  # the detector prefix is stripped
    assert scores["cat/a.csv"][3] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- nab-dev


@pytest.fixture(scope="module")
def nab_files() -> list[NabFile]:
    if not NAB_DEV.is_dir():
        pytest.skip(f"nab-dev data not found at {NAB_DEV}")
    return load_corpus(NAB_DEV)


def test_nab_dev_corpus_shape(nab_files: list[NabFile]) -> None:
    assert len(nab_files) == 24
    assert sum(len(f.windows) for f in nab_files) == 39
    assert 123_000 < sum(f.n for f in nab_files) < 124_000


@pytest.mark.parametrize("detector", sorted(REFERENCE))
def test_reproduces_published_nab_scores(nab_files: list[NabFile], detector: str) -> None:
    scores = load_reference_scores(NAB_DEV, detector)
    assert set(scores) == {f.relpath for f in nab_files}
    t0 = time.perf_counter()
    results = score_all_profiles(nab_files, scores)
    elapsed = time.perf_counter() - t0
    for profile, expected in REFERENCE[detector].items():
        assert results[profile].normalized == pytest.approx(expected, abs=0.01), profile
        assert results[profile].windows == 39
        assert results[profile].tp + results[profile].fn == 39
    assert elapsed < 10.0  # vectorised sweep: well under a second in practice
