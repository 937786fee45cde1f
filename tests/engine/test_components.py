"""The scoring components' contract, for every configuration the README offers × every calibrator.

* each component owns its fields (declared once, disjoint, readable names) and the default layout
  is no larger than the state before the components (1,057 bytes per univariate device);
* every configuration is batching-invariant (one batch, random chunks, one reading at a time);
* a batch that fails half-way (the forecaster raises in its second wave) leaves every device's
  state — rows, rings and hidden state — exactly as it was, and the same batch afterwards scores
  exactly as on a scorer that never failed;
* a snapshot taken in any configuration restores into a scorer that continues identically.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from sensorwatch import CALIBRATORS, ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.scoring.components import COMPONENTS, stuck_check
from tests.engine.helpers import (
    SUPPRESSED,
    assert_results_match,
    channel_magnitude,
    random_history,
    step_in_chunks,
    take,
)
from tests.engine.test_contract import Interleaving, interleavings

#: Every configuration the README offers: each optional component off (or on, if off by default),
#: all of them off, and a seasonal forecaster (its memory is a component too).
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "seasonal_check-off": {"seasonal_check": False},
    "stuck_check-off": {"stuck_check": False},
    "range_check-off": {"range_margin": None},
    "alert_filter-off": {"alert_filter": False},
    "recalibrate-off": {"recalibrate_window": None},
    "gap_reset-off": {"max_gap_s": None},
    "point_likelihood-on": {"point_likelihood": True},
    "all-optional-off": {
        "seasonal_check": False,
        "stuck_check": False,
        "range_margin": None,
        "alert_filter": False,
        "recalibrate_window": None,
    },
    "seasonal-model": {},
}
CASES = list(itertools.product(CONFIGURATIONS, CALIBRATORS))
cases = pytest.mark.parametrize(("config", "calibrator"), CASES, ids=[f"{a}-{b}" for a, b in CASES])


def _scorer_factory(make_model, small_config, config: str, calibrator: str) -> Callable[[], StreamScorer]:
    cfg = small_config(calibrator, **CONFIGURATIONS[config])
    if config == "seasonal-model":
        model = Forecaster(ForecasterConfig(cell="lstm", hidden_size=8, channels=2, seasonal=True))
        with torch.no_grad():
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(5))
        model.eval()
    else:
        model = make_model("lstm")
    return lambda: StreamScorer(model, cfg)


def _store_bytes(scorer: StreamScorer) -> dict[str, bytes]:
    return {name: t.numpy().tobytes() for name, t in scorer.store.columns.items()}


# ---------------------------------------------------------------------------------------------- layout
def test_components_own_disjoint_readably_named_fields() -> None:
    names = [m.NAME for m in COMPONENTS]
    assert len(set(names)) == len(names)
    for m in COMPONENTS:
        fields = [f.name for f in m.STATE]
        assert len(set(fields)) == len(fields), m.NAME
        assert all(len(f) >= 3 and f.islower() for f in fields), m.NAME  # no cryptic st_/sx_ names
        assert list(m.Offsets.names) == fields  # the offsets record is the declaration, once
    layout = StreamScorer.builtin().layout
    spans = sorted(
        (where, off, off + int(np.prod(shape)), name)
        for name, (where, off, shape, _) in layout.fields.items()
    )
    for a, b in itertools.pairwise(spans):
        assert a[0] != b[0] or a[2] <= b[1], (a, b)  # no two fields share a slot of a store


def test_state_per_device_is_not_larger_than_before_the_components() -> None:
    """The components of the refactor fit the state of STATE_VERSION 2; a check added or grown since
    costs only its own declared fields (the spike check: five per channel; episodes three; the stuck
    check's run-length octaves and counts: 14 per channel more; the seasonal check's slow level: one
    per channel; online adaptation: 4 + 2p + p² per channel)."""
    before = StreamScorer.builtin(config=ScorerConfig(spike_z=None, adapt_lags=None))  # seasonal on
    hidden = sum(int(np.prod(s)) * 4 for s in before.model.state_shapes.values())
    stuck_growth = (stuck_check.OCTAVES + 6 - 4) * 8  # fields per channel now, 4 in STATE_VERSION 2
    slow_level = 8  # the seasonal check's slow level offset (seasonal_return), one per channel
    per_device = before.layout.bytes_per_device() - 24 - stuck_growth - slow_level + hidden  # added since
    assert per_device <= 1057, per_device  # 1,057 bytes with the torch columns (STATE_VERSION 2)
    now = StreamScorer.builtin()
    p = ScorerConfig().adapt_lags
    assert now.layout.bytes_per_device() - before.layout.bytes_per_device() == (5 + 4 + 2 * p + p * p) * 8


# ---------------------------------------------------------------------------------------------- behaviour
@cases
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=SUPPRESSED,
)
@given(case=interleavings())
def test_every_configuration_is_batching_invariant(
    config, calibrator, make_model, small_config, case: Interleaving
) -> None:
    new = _scorer_factory(make_model, small_config, config, calibrator)
    whole = new().step(case.batch)
    chunked = step_in_chunks(new(), case.batch, case.cuts)
    assert_results_match(chunked, whole, magnitude=channel_magnitude(case.batch.values))


class Boom(RuntimeError):
    pass


#: A failing batch in both execution paths: waves (a channel missing: the forecast is needed to
#: impute it) and per-device sequences (every channel observed: the forecaster runs once over each
#: device's readings, after the features of all of them were built and their rings written).
FAILURES = {
    "waves": ("step", [[1.0, 20.0], [2.0, np.nan], [1.5, 21.0], [0.0, 5.0], [2.5, 22.0]], 2),
    "sequences": ("forward", [[1.0, 20.0], [2.0, 3.0], [1.5, 21.0], [0.0, 5.0], [2.5, 22.0]], 2),
}


@cases
@pytest.mark.parametrize("path", FAILURES)
def test_a_failing_batch_leaves_every_device_untouched(
    config, calibrator, path, make_model, small_config
) -> None:
    new = _scorer_factory(make_model, small_config, config, calibrator)
    scorer, twin = new(), new()
    history = random_history(np.random.default_rng(3), ["a", "b", "c"], per_device=40)
    for s in (scorer, twin):
        s.step(history)
    before = _store_bytes(scorer)
    t = float(history.ts.max())
    method, values, fail_at = FAILURES[path]
    # Two readings of "a" and "b" (two waves, or sequences of 2) and a new device "d" (1 reading).
    batch = ReadingBatch(["a", "b", "a", "d", "b"], [t + 10, t + 10, t + 20, t + 10, t + 20], values)
    real = getattr(scorer.model, method)
    calls = {"n": 0}

    def failing(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Boom(f"forecaster failed in its call {fail_at}")
        return real(*args, **kw)

    setattr(scorer.model, method, failing)
    with pytest.raises(Boom):
        scorer.step(batch)
    assert calls["n"] == fail_at  # the first call had run (and its rings were written) before the failure
    after = _store_bytes(scorer)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], f"{config}/{path}: {name} changed by a failed batch"
    delattr(scorer.model, method)
    assert_results_match(scorer.step(batch), twin.step(batch), exact=True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sequences_of_distinct_lengths_equal_each_device_alone(cell, make_model, small_config) -> None:
    """A gateway batch whose devices bring different numbers of readings runs as time segments
    shared by the devices still going (one forecaster call per distinct length), and equals scoring
    each device's readings in a batch of its own (within the contract's float32 tolerance: torch's
    kernels may round differently by batch size; for the shipped LSTM shape, one layer of 32, the
    two were bit-identical on the CPUs measured)."""
    model = make_model(cell)
    lengths = {"a": 1, "b": 3, "c": 7, "d": 7, "e": 20, "f": 45}
    history = random_history(np.random.default_rng(5), list(lengths), per_device=30)
    t = float(history.ts.max())
    rng = np.random.default_rng(6)
    rows = [(d, t + 10.0 * (k + 1)) for d, n in lengths.items() for k in range(n)]
    order = rng.permutation(len(rows))  # devices interleaved, each in its own time order
    rows = sorted((rows[i] for i in order), key=lambda r: r[1])
    values = rng.normal(0.0, 5.0, (len(rows), 2))
    batch = ReadingBatch([d for d, _ in rows], [ts for _, ts in rows], values)

    together, alone = (StreamScorer(model, small_config("likelihood")) for _ in range(2))
    for s in (together, alone):
        s.step(history)
    steps: list[int] = []  # time steps of each forecaster call
    real = together.model.forward

    def counted(features: torch.Tensor, *args: Any, **kw: Any) -> Any:
        steps.append(features.shape[1])
        return real(features, *args, **kw)

    together.model.forward = counted  # type: ignore[method-assign]
    got = together.step(batch)
    del together.model.forward
    # The sequence path: one call per distinct length, max(lengths) sequential steps in all (one
    # call per length over its whole length would be 1 + 3 + 7 + 20 + 45 = 76).
    assert len(steps) == len(set(lengths.values()))
    assert sum(steps) == max(lengths.values())
    for device in lengths:
        mask = np.array([d == device for d in batch.device_ids])
        own = alone.step(ReadingBatch([device] * int(mask.sum()), batch.ts[mask], values[mask]))
        assert_results_match(take(got, mask), own, magnitude=channel_magnitude(values))
    for device in lengths:
        for name, value in together.state_of(device).items():
            want = alone.state_of(device)[name]
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5, err_msg=name)


@cases
def test_every_configuration_snapshots_and_continues_identically(
    config, calibrator, make_model, small_config, tmp_path
) -> None:
    new = _scorer_factory(make_model, small_config, config, calibrator)
    rng = np.random.default_rng(4)
    first = random_history(rng, ["a", "b"], per_device=30)
    scorer = new()
    scorer.step(first)
    path = tmp_path / "state.safetensors"
    scorer.snapshot(str(path))
    restored = new()
    restored.restore(str(path))
    later = random_history(rng, ["a", "b"], per_device=10, t0=float(first.ts.max()) + 1.0)
    assert_results_match(restored.step(later), scorer.step(later), exact=True)
