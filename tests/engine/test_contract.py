"""The streaming engine's contract, for every recurrent cell × every calibrator.

The contract tests are parametrised over ``sensorwatch.CELLS`` × ``sensorwatch.CALIBRATORS`` and use
a forecaster with random weights (see ``make_model`` in conftest), so the hidden state matters.
The last test checks that each optional check ``ScorerConfig`` documents can be switched off.

Numerical note: the forecaster runs in float32 and torch's CPU kernels give results that depend
on the batch size in the last bits (one bare ``Forecaster.step`` on B rows vs B single-row steps
differs by up to ~4e-7), so "equal" means equal up to float32 noise:

* ``predicted`` is in the data's units: within 1e-5 relative to the channel's magnitude in the
  batch (max(1, max |value|)); measured worst case 5.4e-7 of it.
* ``z`` and ``attribution`` divide by the predicted scale, which amplifies that noise: within 1e-4
  (relative to max(1, |z|), absolute for attribution); measured worst cases 5e-6 and 1.3e-5.
* every other numeric column: within 1e-5; measured worst case 1.5e-6.

(Measured over 150 hypothesis examples and 150 random interleavings per cell.)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorwatch import (
    CALIBRATORS,
    CELLS,
    ReadingBatch,
    ScorerConfig,
    StateIncompatibleError,
    StreamScorer,
)
from sensorwatch.scoring.features import featurize_sequence
from tests.engine.helpers import (
    SUPPRESSED,
    T0,
    assert_results_match,
    channel_magnitude,
    random_history,
    step_in_chunks,
)

COMBOS = list(itertools.product(CELLS, CALIBRATORS))
COMBO_IDS = [f"{cell}-{cal}" for cell, cal in COMBOS]
combos = pytest.mark.parametrize(("cell", "calibrator"), COMBOS, ids=COMBO_IDS)


# ---------------------------------------------------------------------------------------------- strategies
@dataclass
class Interleaving:
    batch: ReadingBatch
    cuts: list[int]


_steps = st.tuples(st.integers(0, 15), st.floats(0.5, 900.0)).map(
    lambda t: 30_000.0 if t[0] == 0 else t[1]  # now and then a gap longer than max_gap_s (6 h)
)
_values = st.tuples(st.integers(0, 7), st.floats(-100.0, 100.0)).map(
    lambda t: math.nan if t[0] == 0 else t[1]  # now and then a missing channel
)


@st.composite
def interleavings(draw: st.DrawFn) -> Interleaving:
    n_dev = draw(st.integers(2, 6))
    per_device: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n_dev):
        n = draw(st.integers(1, 40))
        steps = draw(st.lists(_steps, min_size=n, max_size=n))
        values = draw(st.lists(st.tuples(_values, _values), min_size=n, max_size=n))
        per_device.append((T0 + np.cumsum(steps), np.array(values, dtype=np.float64)))
    # A random merge that keeps each device's own order: a permutation of the device multiset.
    slots = draw(st.permutations([d for d, (ts, _) in enumerate(per_device) for _ in range(len(ts))]))
    taken = [0] * n_dev
    ids, ts, vals = [], [], []
    for d in slots:
        k = taken[d]
        taken[d] += 1
        ids.append(f"dev-{d}")
        ts.append(per_device[d][0][k])
        vals.append(per_device[d][1][k])
    n = len(ids)
    cuts = draw(st.lists(st.integers(1, n - 1), unique=True, max_size=12)) if n > 1 else []
    return Interleaving(ReadingBatch(ids, np.array(ts), np.array(vals)), cuts)


# ---------------------------------------------------------------------------------------------- tests
@combos
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=SUPPRESSED,
)
@given(case=interleavings())
def test_batching_invariance(cell, calibrator, make_model, small_config, case: Interleaving) -> None:
    """One batch, random chunks and one reading at a time give the same results."""
    model = make_model(cell)
    cfg = small_config(calibrator)
    batch = case.batch
    whole = StreamScorer(model, cfg).step(batch)
    chunked = step_in_chunks(StreamScorer(model, cfg), batch, case.cuts)
    single = step_in_chunks(StreamScorer(model, cfg), batch, list(range(1, len(batch))))
    magnitude = channel_magnitude(batch.values)
    assert_results_match(chunked, whole, magnitude=magnitude)
    assert_results_match(single, whole, magnitude=magnitude)
    # The generated data is mostly valid: only readings with every channel missing are refused.
    no_values = np.isnan(batch.values).all(1)
    np.testing.assert_array_equal(whole.accepted, ~no_values)


@combos
def test_streaming_equals_full_sequence_forward(cell, calibrator, make_model, small_config) -> None:
    """Step-by-step streaming predicts exactly what the full-sequence forward pass predicts."""
    model = make_model(cell)
    cfg = small_config(calibrator)
    rng = np.random.default_rng(7)
    lengths = [40, 23, 1, 9, 31]
    b, t = len(lengths), max(lengths)
    values = np.zeros((b, t, 2))  # padding: 0
    ts = np.zeros((b, t))
    for i, n in enumerate(lengths):
        values[i, :n] = rng.normal(size=(n, 2)) * [1.0, 10.0] + [0.0, 50.0]
        ts[i, :n] = T0 + np.cumsum(rng.uniform(1.0, 600.0, n))  # irregular, no gap > max_gap_s

    def forward(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, centre, scale = featurize_sequence(torch.from_numpy(vals), torch.from_numpy(ts), cfg)
        with torch.no_grad():
            mean, _, _ = model(feats, torch.tensor(lengths))
        return (mean.to(torch.float64) * scale + centre).numpy(), scale.numpy()

    pred, scale = forward(values)

    # Padded positions do not leak into valid ones: other padding, same valid outputs.
    other_pad = values.copy()
    for i, n in enumerate(lengths):
        other_pad[i, n:] = 1e3 * (i + 1)
    pred_other, _ = forward(other_pad)
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(pred_other[i, :n], pred[i, :n])
        # …and equal to running that sequence alone, unpadded.
        feats1, centre1, scale1 = featurize_sequence(
            torch.from_numpy(values[i : i + 1, :n]), torch.from_numpy(ts[i : i + 1, :n]), cfg
        )
        with torch.no_grad():
            mean1, _, _ = model(feats1)
        alone = (mean1.to(torch.float64) * scale1 + centre1).numpy()[0]
        np.testing.assert_allclose(alone, pred[i, :n], rtol=1e-5, atol=1e-6 * float(scale1.max()))

    # Streaming: all devices together, interleaved in time — the model's own forecasts (online
    # adaptation corrects them per device: tests/engine/test_adapt.py).
    cfg = cfg.model_copy(update={"adapt_lags": None})
    ids = [f"d{i}" for i, n in enumerate(lengths) for _ in range(n)]
    flat_ts = np.concatenate([ts[i, :n] for i, n in enumerate(lengths)])
    flat_vals = np.concatenate([values[i, :n] for i, n in enumerate(lengths)])
    order = np.argsort(flat_ts, kind="stable")
    scorer = StreamScorer(model, cfg)
    res = scorer.step(ReadingBatch([ids[k] for k in order], flat_ts[order], flat_vals[order]))
    assert res.accepted.all()
    predicted = np.empty_like(res.predicted)
    predicted[order] = res.predicted
    start = 0
    for i, n in enumerate(lengths):
        got = predicted[start : start + n]
        start += n
        assert np.isnan(got[0]).all(), "a device's first reading has no prediction"
        want = pred[i, : n - 1]  # prediction made at reading t is for reading t+1
        # 1e-4 relative, with the series' own scale as the floor (channel 0 has mean 0).
        bound = 1e-4 * (np.abs(want) + scale[i, : n - 1])
        err = np.abs(got[1:] - want)
        assert (err <= bound).all(), f"device d{i}: max |Δ| {err.max():.3g}"


@combos
def test_snapshot_restore_continues_identically(cell, calibrator, make_model, small_config, tmp_path) -> None:
    model = make_model(cell)
    cfg = small_config(calibrator)
    rng = np.random.default_rng(3)
    devices = [f"dev-{i}" for i in range(6)]
    history = random_history(rng, devices, per_device=30)
    more = random_history(rng, devices, per_device=20, t0=float(history.ts.max()) + 1.0)

    original = StreamScorer(model, cfg, model_version="m/1")
    original.step(history)
    path = tmp_path / "state.safetensors"
    original.snapshot(str(path))
    want = original.step(more)

    restored = StreamScorer(model, cfg)
    extra = restored.restore(str(path))
    assert extra["model_version"] == "m/1"
    assert sorted(restored.store.device_ids()) == devices
    got = restored.step(more)
    assert_results_match(got, want, exact=True)
    assert want.accepted.all()
    assert not want.warming_up[-len(devices) :].any()


@combos
def test_restore_refuses_incompatible_or_corrupt_snapshots(
    cell, calibrator, make_model, small_config, tmp_path
) -> None:
    cfg = small_config(calibrator)
    scorer = StreamScorer(make_model(cell), cfg)
    scorer.step(random_history(np.random.default_rng(0), ["a", "b"], per_device=5))
    path = tmp_path / "state.safetensors"
    scorer.snapshot(str(path))

    # The error names what differs (so these pass for the right reason).
    other_cell = next(c for c in CELLS if c != cell)
    for other in (make_model(other_cell), make_model(cell, hidden=8)):
        victim = StreamScorer(other, cfg)
        with pytest.raises(StateIncompatibleError, match="'model'"):
            victim.restore(str(path))
        assert len(victim.store) == 0
    other_cal = next(c for c in CALIBRATORS if c != calibrator)
    with pytest.raises(StateIncompatibleError, match="'calibrator'"):
        StreamScorer(make_model(cell), small_config(other_cal)).restore(str(path))

    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a snapshot " * 40)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    fresh = StreamScorer(make_model(cell), cfg)
    for bad in (truncated, garbage, empty):
        with pytest.raises(StateIncompatibleError):
            fresh.restore(str(bad))
    # A refused restore leaves the store as it was (here: empty and usable).
    assert len(fresh.store) == 0
    assert fresh.step(ReadingBatch(["x"], [T0], [[1.0, 2.0]])).accepted.all()


@combos
def test_inputs_are_never_mutated(cell, calibrator, make_model, small_config) -> None:
    model = make_model(cell)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scorer = StreamScorer(model, small_config(calibrator))
    rng = np.random.default_rng(1)
    for k in range(3):
        batch = random_history(rng, ["a", "b", "c"], per_device=8, t0=T0 + k * 10_000)
        batch.reject[1] = "bad_value"  # a parse-time rejection rides along
        batch.values[2, :] = np.nan  # and a reading with no values
        before = (list(batch.device_ids), batch.ts.copy(), batch.values.copy(), batch.reject.copy())
        scorer.step(batch)
        assert batch.device_ids == before[0]
        np.testing.assert_array_equal(batch.ts, before[1])
        np.testing.assert_array_equal(batch.values, before[2])
        np.testing.assert_array_equal(batch.reject, before[3])
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k


@combos
def test_deterministic_under_a_seed(cell, calibrator, make_model, small_config) -> None:
    batch = random_history(np.random.default_rng(5), ["a", "b", "c", "d"], per_device=25)
    cfg = small_config(calibrator)
    first = StreamScorer(make_model(cell, seed=11), cfg).step(batch)
    second = StreamScorer(make_model(cell, seed=11), cfg).step(batch)
    assert_results_match(second, first, exact=True)
    # …and the seed matters (the test would be vacuous if the weights were ignored).
    third = StreamScorer(make_model(cell, seed=12), cfg).step(batch)
    assert not np.allclose(third.predicted[first.accepted], first.predicted[first.accepted], equal_nan=True)


@combos
def test_capacity_evicts_least_recently_used(cell, calibrator, make_model) -> None:
    model = make_model(cell, hidden=8, layers=1, channels=1)
    scorer = StreamScorer(model, ScorerConfig(calibrator=calibrator, max_devices=10_000))
    per_batch, total = 5_000, 100_000
    for start in range(0, total, per_batch):
        ids = [f"dev-{i}" for i in range(start, start + per_batch)]
        res = scorer.step(ReadingBatch(ids, np.full(per_batch, T0), np.ones((per_batch, 1))))
        assert res.accepted.all()
    assert len(scorer.store) == 10_000
    assert scorer.store.evictions["lru"] == 90_000
    assert scorer.store.evictions["ttl"] == 0
    # The survivors are the most recently seen devices.
    assert set(scorer.store.device_ids()) == {f"dev-{i}" for i in range(total - 10_000, total)}


@combos
def test_idle_devices_expire_after_ttl(cell, calibrator, make_model, small_config) -> None:
    now = [1000.0]
    cfg = small_config(calibrator, device_ttl_s=10.0)
    scorer = StreamScorer(make_model(cell), cfg, clock=lambda: now[0])
    scorer.step(ReadingBatch(["a", "b", "c"], [T0, T0, T0], [[1.0, 2.0]] * 3))
    now[0] += 6.0
    scorer.step(ReadingBatch(["a"], [T0 + 6], [[1.0, 2.0]]))  # "a" is active, b and c idle
    assert len(scorer.store) == 3
    now[0] += 6.0  # b, c idle for 12 s > 10 s; a for 6 s
    res = scorer.step(ReadingBatch(["d"], [T0 + 12], [[1.0, 2.0]]))
    assert res.accepted.all()
    assert sorted(scorer.store.device_ids()) == ["a", "d"]
    assert scorer.store.evictions["ttl"] == 2
    assert scorer.store.evictions["lru"] == 0
    # An expired device starts over.
    res = scorer.step(ReadingBatch(["b"], [T0 + 13], [[1.0, 2.0]]))
    assert res.warming_up.all()
    assert np.isnan(res.predicted).all()


@combos
def test_reset_forgets_a_device(cell, calibrator, make_model, small_config) -> None:
    scorer = StreamScorer(make_model(cell), small_config(calibrator))
    history = random_history(np.random.default_rng(2), ["a", "b"], per_device=12)
    scorer.step(history)
    last = float(history.ts.max())
    res = scorer.step(ReadingBatch(["a", "b"], [last + 1, last + 1], [[0.5, 20.0]] * 2))
    assert not res.warming_up.any()
    assert np.isfinite(res.predicted).all()

    b_rows = scorer.store.copy_rows(["b"])["b"]
    assert scorer.reset("a") is True
    assert "a" not in scorer.store
    assert scorer.reset("a") is False
    assert scorer.reset("never-seen") is False
    # The other device is untouched.
    for name, value in scorer.store.copy_rows(["b"])["b"].items():
        assert torch.equal(value, b_rows[name]), name

    # "a" starts over: even a timestamp before its old last one is fine now.
    res = scorer.step(ReadingBatch(["a", "b"], [T0 - 100.0, last + 2], [[0.5, 20.0]] * 2))
    assert res.accepted.tolist() == [True, True]
    assert res.warming_up.tolist() == [True, False]
    assert np.isnan(res.predicted[0]).all()
    assert np.isfinite(res.predicted[1]).all()
    assert res.raw_score[0] == 0.0
    assert not res.is_anomaly[0]


def test_combos_cover_every_cell_and_calibrator() -> None:
    assert {c for c, _ in COMBOS} == set(CELLS)
    assert {c for _, c in COMBOS} == set(CALIBRATORS)
    assert len(COMBOS) == len(CELLS) * len(CALIBRATORS) >= 6


SWITCHES = {
    "stuck_check-off": {"stuck_check": False},
    "recalibrate-off": {"recalibrate_window": None},
    "range_check-off": {"range_margin": None},
    "gap_reset-off": {"max_gap_s": None},
}


@pytest.mark.parametrize("calibrator", CALIBRATORS)
@pytest.mark.parametrize("switch", SWITCHES.values(), ids=SWITCHES.keys())
def test_documented_switches_can_be_turned_off(calibrator, switch, make_model, small_config) -> None:
    """Every optional check that ScorerConfig documents as switchable scores normally when off."""
    scorer = StreamScorer(make_model("gru"), small_config(calibrator, **switch))
    history = random_history(np.random.default_rng(8), ["a", "b"], per_device=30)
    res = scorer.step(history)
    assert res.accepted.all()
    later = float(history.ts.max()) + 1e6  # far beyond the default max_gap_s
    res = scorer.step(ReadingBatch(["a", "b"], [later, later], [[0.0, 20.0], [np.nan, 20.0]]))
    assert res.accepted.all()
    assert res.gap_reset.tolist() == ([False, False] if switch.get("max_gap_s", 0) is None else [True, True])
    assert np.isfinite(res.likelihood).all()
