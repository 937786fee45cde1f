"""Every reason code the engine produces, imputation, gap resets and in-batch ordering.

For each rejection: the reading is refused with its reason, the refused device's state rows are
bit-for-bit unchanged, and the other readings of the same batch are scored exactly as they would
have been without the bad one (compared with a twin scorer that never saw it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sensorwatch import Reading, ReadingBatch, RejectReason, StreamScorer
from sensorwatch.scoring import features as feat
from tests.engine.helpers import T0, assert_results_match, take

DEVICES = ("a", "b", "c")
HISTORY = 12  # readings per device before the batch under test
STEP = 60.0
LAST = T0 + (HISTORY - 1) * STEP  # every device's last timestamp after the history
NEXT = LAST + STEP


def history_records() -> list[Reading]:
    rng = np.random.default_rng(0)
    return [
        Reading(d, T0 + k * STEP, [float(rng.normal()), float(20 + 5 * rng.normal())])
        for k in range(HISTORY)
        for d in DEVICES
    ]


@pytest.fixture
def twins(make_model, small_config) -> tuple[StreamScorer, StreamScorer]:
    """Two scorers in the same state: one sees the bad readings, the other only the good ones."""
    model = make_model("lstm")
    pair = []
    for _ in range(2):
        scorer = StreamScorer(model, small_config("likelihood"))
        assert scorer.step(history_records()).accepted.all()
        pair.append(scorer)
    return pair[0], pair[1]


#: The scorer's field names (``StreamScorer.state_of``) by the names the featurizer's functions use.
FEATURIZER_NAMES = {
    "normaliser.count": "norm_n",
    "normaliser.mean": "norm_mean",
    "normaliser.var": "norm_var",
    "normaliser.dt_count": "dt_n",
    "normaliser.dt_log_mean": "dt_logmean",
}


def rows(scorer: StreamScorer, ids: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each device's state by field name (copies), as tensors."""
    out = {}
    for d in ids:
        state = scorer.state_of(d)
        if state is not None:
            out[d] = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    return out


def assert_rows_equal(
    got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]
) -> None:
    assert got.keys() == want.keys()
    for device, cols in want.items():
        for name, value in cols.items():
            # Bitwise (NaN-aware): compare the raw bytes.
            assert got[device][name].dtype == value.dtype
            assert got[device][name].numpy().tobytes() == value.numpy().tobytes(), (device, name)


@dataclass
class Case:
    reason: RejectReason
    readings: list[Reading]
    bad: list[int]  # positions of the readings that must be refused with ``reason``


GOOD = [Reading("b", NEXT, [0.3, 21.0]), Reading("c", NEXT, [None, 19.0])]

CASES = {
    "wrong_channel_count-short": Case(
        RejectReason.WRONG_CHANNEL_COUNT, [GOOD[0], Reading("a", NEXT, [1.0]), GOOD[1]], [1]
    ),
    "wrong_channel_count-long": Case(
        RejectReason.WRONG_CHANNEL_COUNT, [Reading("a", NEXT, [1.0, 2.0, 3.0]), *GOOD], [0]
    ),
    "unknown_channel": Case(
        RejectReason.UNKNOWN_CHANNEL, [*GOOD, Reading("a", NEXT, {"ch0": 1.0, "humidity": 2.0})], [2]
    ),
    "value_too_large": Case(RejectReason.VALUE_TOO_LARGE, [*GOOD, Reading("a", NEXT, [1e308, 20.0])], [2]),
    "non_finite-inf": Case(RejectReason.NON_FINITE, [*GOOD, Reading("a", NEXT, [math.inf, 20.0])], [2]),
    "non_finite-neg-inf-one-channel": Case(
        RejectReason.NON_FINITE, [Reading("a", NEXT, [0.0, -math.inf]), *GOOD], [0]
    ),
    "bad_value-string": Case(RejectReason.BAD_VALUE, [*GOOD, Reading("a", NEXT, ["1.5", 20.0])], [2]),
    "bad_value-bool": Case(RejectReason.BAD_VALUE, [*GOOD, Reading("a", NEXT, [True, 20.0])], [2]),
    "bad_value-not-a-list": Case(RejectReason.BAD_VALUE, [*GOOD, Reading("a", NEXT, "1.5,20")], [2]),  # type: ignore[arg-type]
    "no_values-none": Case(RejectReason.NO_VALUES, [*GOOD, Reading("a", NEXT, [None, None])], [2]),
    "no_values-nan": Case(RejectReason.NO_VALUES, [*GOOD, Reading("a", NEXT, [math.nan, math.nan])], [2]),
    "no_values-empty-mapping": Case(RejectReason.NO_VALUES, [*GOOD, Reading("a", NEXT, {})], [2]),
    "bad_timestamp-unparseable": Case(
        RejectReason.BAD_TIMESTAMP, [*GOOD, Reading("a", "yesterday at noon", [1.0, 20.0])], [2]
    ),
    "bad_timestamp-no-timezone": Case(
        RejectReason.BAD_TIMESTAMP, [*GOOD, Reading("a", "2024-01-01T00:00:00", [1.0, 20.0])], [2]
    ),
    "bad_timestamp-nan": Case(RejectReason.BAD_TIMESTAMP, [*GOOD, Reading("a", math.nan, [1.0, 20.0])], [2]),
    "out_of_order": Case(RejectReason.OUT_OF_ORDER, [*GOOD, Reading("a", LAST - 1.0, [1.0, 20.0])], [2]),
    "duplicate_timestamp-last": Case(
        RejectReason.DUPLICATE_TIMESTAMP, [*GOOD, Reading("a", LAST, [1.0, 20.0])], [2]
    ),
    "bad_device_id-empty": Case(RejectReason.BAD_DEVICE_ID, [*GOOD, Reading("", NEXT, [1.0, 20.0])], [2]),
    "bad_device_id-not-a-string": Case(
        RejectReason.BAD_DEVICE_ID,
        [*GOOD, Reading(7, NEXT, [1.0, 20.0])],  # type: ignore[arg-type]
        [2],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_rejected_reading_leaves_state_untouched_and_others_scored(twins, case: Case) -> None:
    scorer, twin = twins
    known = [d for d in DEVICES if d in scorer.store]
    before = rows(scorer, known)

    res = scorer.step(case.readings)
    bad = np.zeros(len(case.readings), dtype=bool)
    bad[case.bad] = True
    assert not res.accepted[bad].any()
    assert res.reason[bad].tolist() == [case.reason.value] * bad.sum()
    assert res.reason[bad].tolist() == [str(case.reason)] * bad.sum()
    # Rejected readings carry no numbers.
    assert np.isnan(res.predicted[bad]).all()
    assert np.isnan(res.likelihood[bad]).all()
    assert not res.is_anomaly[bad].any()
    assert scorer.counters[case.reason.value] == bad.sum()
    for i in np.flatnonzero(bad):
        assert res.record(int(i)) == {
            "device_id": case.readings[i].device_id,
            "ts": float(res.ts[i]) if math.isfinite(res.ts[i]) else None,  # JSON-ready: no NaN
            "accepted": False,
            "reason": case.reason.value,
        }

    # The columnar records (REST answers, published scores) equal the row-by-row ones, field for field.
    assert res.records() == [res.record(i) for i in range(len(res))]
    assert res.records([len(res) - 1, 0]) == [res.record(len(res) - 1), res.record(0)]

    # The good readings are scored exactly as without the bad ones.
    good = [r for i, r in enumerate(case.readings) if not bad[i]]
    want = twin.step(good)
    assert res.accepted[~bad].all()
    assert_results_match(take(res, ~bad), want, magnitude=np.array([1.0, 25.0]))

    # The refused devices' rows are unchanged; all rows match the twin's.
    refused = {case.readings[i].device_id for i in case.bad} & set(known)
    after = rows(scorer, known)
    assert_rows_equal({d: after[d] for d in refused}, {d: before[d] for d in refused})
    assert_rows_equal(rows(scorer, ["a"]), rows(twin, ["a"]))
    assert sorted(scorer.store.device_ids()) == sorted(twin.store.device_ids())


def test_duplicate_timestamps_within_one_batch(twins) -> None:
    scorer, twin = twins
    before = rows(scorer, ["a"])
    readings = [GOOD[0], Reading("a", NEXT, [1.0, 20.0]), Reading("a", NEXT, [2.0, 21.0]), GOOD[1]]
    res = scorer.step(readings)
    assert res.accepted.tolist() == [True, True, False, True]
    assert res.reason[2] == "duplicate_timestamp"
    want = twin.step([readings[0], readings[1], readings[3]])
    assert_results_match(take(res, res.accepted), want, magnitude=np.array([1.0, 25.0]))
    assert_rows_equal(rows(scorer, ["a"]), rows(twin, ["a"]))
    assert rows(scorer, ["a"])["a"]["core.count"] == before["a"]["core.count"] + 1


def test_out_of_order_and_duplicate_against_last_in_a_multi_reading_batch(twins) -> None:
    """The same checks on the path for batches where a device has several readings."""
    scorer, twin = twins
    readings = [
        Reading("a", LAST, [1.0, 20.0]),  # duplicate of the stored last
        Reading("a", NEXT, [1.0, 20.0]),
        Reading("a", LAST - 30, [1.0, 20.0]),  # before the stored last
        Reading("b", NEXT, [1.0, 20.0]),
        Reading("b", NEXT + STEP, [1.1, 20.5]),
    ]
    res = scorer.step(readings)
    assert res.accepted.tolist() == [False, True, False, True, True]
    assert res.reason.tolist()[:3] == ["duplicate_timestamp", None, "out_of_order"]
    want = twin.step([readings[i] for i in (1, 3, 4)])
    assert_results_match(take(res, res.accepted), want, magnitude=np.array([1.0, 25.0]))


def test_wrong_width_reading_batch_is_refused_whole(twins) -> None:
    scorer, _ = twins
    before = rows(scorer, list(DEVICES))
    batch = ReadingBatch(["a", "b", "new"], [NEXT, NEXT, NEXT], np.ones((3, 3)))
    batch.reject[1] = RejectReason.BAD_VALUE.value  # a parse-time reason is kept
    res = scorer.step(batch)
    assert not res.accepted.any()
    assert res.reason.tolist() == ["wrong_channel_count", "bad_value", "wrong_channel_count"]
    assert_rows_equal(rows(scorer, list(DEVICES)), before)
    assert "new" not in scorer.store
    assert scorer.counters["wrong_channel_count"] == 2


def test_reading_batch_non_finite_and_bad_timestamp(twins) -> None:
    """Columnar input is validated too (not only Reading records)."""
    scorer, twin = twins
    before = rows(scorer, ["a", "c"])
    ids = ["a", "b", "c", "new"]
    ts = np.array([NEXT, NEXT, np.nan, np.inf])
    values = np.array([[np.inf, 20.0], [0.5, 20.0], [0.5, 20.0], [0.5, 20.0]])
    res = scorer.step(ReadingBatch(ids, ts, values))
    assert res.reason.tolist() == ["non_finite", None, "bad_timestamp", "bad_timestamp"]
    assert "new" not in scorer.store
    assert_rows_equal(rows(scorer, ["a", "c"]), before)
    want = twin.step(ReadingBatch(["b"], [NEXT], [[0.5, 20.0]]))
    assert_results_match(take(res, res.accepted), want, magnitude=np.array([1.0, 25.0]))


def test_capacity_refuses_devices_beyond_max_devices(make_model, small_config) -> None:
    model = make_model("gru")
    cfg = small_config("likelihood", max_devices=3)
    scorer, twin = StreamScorer(model, cfg), StreamScorer(model, cfg)
    ids = ["d1", "d2", "d1", "d3", "d4", "d5"]
    ts = [T0, T0, T0 + 1, T0, T0, T0 + 5]
    values = np.array([[1.0, 2.0], [1.5, 2.5], [1.1, 2.1], [0.0, 1.0], [3.0, 4.0], [5.0, 6.0]])
    res = scorer.step(ReadingBatch(ids, ts, values))
    assert res.accepted.tolist() == [True, True, True, True, False, False]
    assert res.reason.tolist()[4:] == ["capacity", "capacity"]
    assert sorted(scorer.store.device_ids()) == ["d1", "d2", "d3"]
    assert scorer.counters["capacity"] == 2
    want = twin.step(ReadingBatch(ids[:4], ts[:4], values[:4]))
    assert_results_match(take(res, res.accepted), want, magnitude=np.array([5.0, 6.0]))
    # A later batch makes room by evicting the least recently used device.
    res = scorer.step(ReadingBatch(["d4"], [T0 + 10], [[1.0, 1.0]]))
    assert res.accepted.all()
    assert scorer.store.evictions["lru"] == 1


def test_missing_channel_is_imputed_with_the_prediction(make_model, small_config) -> None:
    model = make_model("lstm")
    cfg = small_config("likelihood")
    scorer = StreamScorer(model, cfg)
    scorer.step(history_records())
    g = {k: v[None] for k, v in rows(scorer, ["a"])["a"].items()}  # (1, …) rows before the step
    g.update({FEATURIZER_NAMES[k]: v for k, v in g.items() if k in FEATURIZER_NAMES})
    assert bool((g["core.count"] > 0).all())  # the device has a prediction

    res = scorer.step([Reading("a", NEXT, [0.7, None])])
    assert res.accepted.all()
    assert res.reason[0] is None
    assert res.imputed.tolist() == [[False, True]]
    assert res.record(0)["imputed"] == ["ch1"]
    assert np.isfinite(res.predicted).all()
    np.testing.assert_array_equal(res.predicted[0], g["forecast.pred_mean"][0].numpy())
    assert np.isfinite(res.z[0, 0])
    assert np.isnan(res.z[0, 1])  # no residual for the missing channel
    np.testing.assert_array_equal(res.attribution[0], [1.0, 0.0])
    after = rows(scorer, ["a"])["a"]
    # The missing channel's normaliser statistics are untouched; the observed one's updated.
    assert after["normaliser.count"][1] == g["norm_n"][0, 1]
    assert after["normaliser.mean"][1] == g["norm_mean"][0, 1]
    assert after["normaliser.count"][0] == g["norm_n"][0, 0] + 1

    # The model was fed the prediction in place of the missing value (recomputed by hand), and
    # that is distinguishable from imputing with the running mean.
    def next_prediction(fill: torch.Tensor) -> torch.Tensor:
        x = torch.tensor([[0.7, math.nan]], dtype=torch.float64)
        observed = ~torch.isnan(x)
        x_filled = torch.where(observed, x, fill)
        x_norm, centre, scale, _ = feat.normalise(g, x_filled, observed, cfg)
        dt = torch.tensor([NEXT], dtype=torch.float64) - g["core.last_ts"]
        dt_feat, _ = feat.delta_t_feature(g, dt, torch.tensor([True]), cfg)
        state = {k: g[f"hidden.{k}"] for k in model.state_shapes}
        with torch.inference_mode():
            mean_n, _, _ = model.step(feat.assemble(x_norm, observed, dt_feat), state)
        return (mean_n.to(torch.float64) * scale + centre)[0]

    with_prediction = next_prediction(g["forecast.pred_mean"])
    with_mean = next_prediction(g["norm_mean"])
    torch.testing.assert_close(after["forecast.pred_mean"], with_prediction, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(with_prediction, with_mean, rtol=1e-3, atol=1e-6)


def test_gap_longer_than_max_gap_resets_state(make_model, small_config) -> None:
    cfg = small_config("threshold", max_gap_s=100.0)
    scorer = StreamScorer(make_model("gru"), cfg)
    base = [Reading(d, T0 + k * 10.0, [math.sin(k), 20.0 + k]) for k in range(12) for d in ("a", "b")]
    res = scorer.step(base)
    assert not res.gap_reset.any()
    assert scorer.counters["gap_resets"] == 0
    last = T0 + 110.0

    # "a" comes back after 1000 s, "b" after 100 s (not longer than max_gap_s).
    res = scorer.step([Reading("a", last + 1000.0, [0.5, 30.0]), Reading("b", last + 100.0, [0.5, 30.0])])
    assert res.accepted.all()
    assert res.gap_reset.tolist() == [True, False]
    assert res.warming_up.tolist() == [True, False]
    assert np.isnan(res.predicted[0]).all()  # the stale prediction is not used
    assert np.isfinite(res.predicted[1]).all()
    assert res.raw_score[0] == 0.0
    assert scorer.counters["gap_resets"] == 1
    after = rows(scorer, ["a"])["a"]
    assert after["core.since_reset"] == 1
    assert after["core.count"] == 13  # the device is not forgotten, only its recurrent state

    # Warm-up restarts: readings 2..warmup after the reset still warm up, the next one does not.
    t = last + 1000.0
    flags = []
    for k in range(cfg.warmup):
        t += 10.0
        flags.append(bool(scorer.step([Reading("a", t, [0.5, 30.0 + k])]).warming_up[0]))
    assert flags == [True] * (cfg.warmup - 1) + [False]

    # Several gaps in one batch are all counted.
    res = scorer.step([Reading("a", t + 500.0, [1.0, 1.0]), Reading("a", t + 1000.0, [1.0, 1.0])])
    assert res.gap_reset.tolist() == [True, True]
    assert scorer.counters["gap_resets"] == 3


def test_readings_of_a_device_are_applied_in_timestamp_order(make_model, small_config) -> None:
    model = make_model("rnn")
    cfg = small_config("threshold")
    rng = np.random.default_rng(4)
    ids = ["a"] * 8 + ["b"] * 5
    ts = np.concatenate([T0 + np.cumsum(rng.uniform(5, 50, 8)), T0 + np.cumsum(rng.uniform(5, 50, 5))])
    values = rng.normal(size=(13, 2)) * [1.0, 3.0] + [0.0, 10.0]
    shuffled = rng.permutation(13)
    got = StreamScorer(model, cfg).step(
        ReadingBatch([ids[i] for i in shuffled], ts[shuffled], values[shuffled])
    )
    want = StreamScorer(model, cfg).step(ReadingBatch(ids, ts, values))
    # Put the shuffled results back in the sorted order and compare.
    back = np.argsort(shuffled)
    assert got.accepted.all()
    assert_results_match(take(got, back), want, magnitude=np.array([3.0, 20.0]))


def test_far_future_readings_are_refused_against_the_scorer_clock(make_model, small_config) -> None:
    """``max_future_s``: a reading stamped beyond the clock + the skew is ts_out_of_range and leaves
    its device untouched; at the limit it is scored; None (the default) checks nothing."""
    model = make_model("lstm")
    now = [T0 + 1000.0]
    scorer = StreamScorer(model, small_config("likelihood", max_future_s=60.0), clock=lambda: now[0])
    res = scorer.step(
        ReadingBatch(["a", "a", "b"], [T0 + 1000.0, T0 + 1061.0, T0 + 1060.0], [[1.0, 2.0]] * 3)
    )
    assert res.reason.tolist() == [None, "ts_out_of_range", None]
    assert scorer.counters["ts_out_of_range"] == 1
    assert rows(scorer, ["a"])["a"]["core.count"] == 1
    now[0] += 10.0  # the clock moves on: the same reading is now within the skew
    assert scorer.step(ReadingBatch(["a"], [T0 + 1061.0], [[1.0, 2.0]])).accepted.tolist() == [True]
    unchecked = StreamScorer(model, small_config("likelihood"), clock=lambda: now[0])
    assert unchecked.step(ReadingBatch(["a"], [1e12], [[1.0, 2.0]])).accepted.tolist() == [True]


def test_every_engine_reason_code_is_exercised() -> None:
    exercised = {case.reason for case in CASES.values()} | {
        RejectReason.CAPACITY,
        RejectReason.TS_OUT_OF_RANGE,
    }
    assert exercised == set(RejectReason)
