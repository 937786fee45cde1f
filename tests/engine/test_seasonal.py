"""Seasonal context of ``seasonal=True`` models: hourly means a day and a week back, streaming ≡ training."""

from __future__ import annotations

import numpy as np
import torch

from sensorwatch import ReadingBatch, StreamScorer
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.scoring import features as feat
from sensorwatch.scoring.config import ScorerConfig

HOUR = 3600.0
T0 = 1_700_006_400.0  # a whole hour (so hour h of the test is clock hour T0/3600 + h)


def _memory(b: int = 1, c: int = 1) -> dict[str, torch.Tensor]:
    return {k: s.allocate(b) for k, s in feat.seasonal_columns(c).items()}


def test_the_network_of_a_seasonal_model_never_sees_the_level() -> None:
    model = _seasonal_model()
    feats = torch.randn(3, 40, model.config.input_size)
    shifted = feats.clone()
    shifted[..., 0] += 5.0  # another level, same steps and lags
    with torch.no_grad():
        m1, s1, _ = model(feats)
        m2, s2, _ = model(shifted)
    torch.testing.assert_close(m2 - m1, torch.full_like(m1, 5.0))  # the forecast moves with the level
    torch.testing.assert_close(s1, s2)


def test_lags_are_the_hourly_means_one_day_and_one_week_back() -> None:
    mem, rows = _memory(), torch.tensor([0])
    # 8 days of 5-minute readings whose value is the hour index plus a within-hour ramp.
    n_hours = 8 * 24
    for h in range(n_hours):
        for m in range(12):
            ts = torch.tensor([T0 + h * HOUR + m * 300.0], dtype=torch.float64)
            x = torch.tensor([[float(h) + m / 11.0]], dtype=torch.float64)
            feat.seasonal_update(mem, rows, ts, x, torch.ones(1, 1, dtype=torch.bool))
    target = torch.tensor([T0 + n_hours * HOUR + 60.0], dtype=torch.float64)  # first hour after the data
    centre = torch.zeros(1, 1, dtype=torch.float64)
    # Hour h averaged h + m/11 over m = 0..11 → h + 0.5; a scale of 100 keeps the normalised value
    # inside the feature clip (SEASON_CLIP).
    scale = torch.full((1, 1), 100.0, dtype=torch.float64)
    out = feat.seasonal_features(mem, rows, target, centre, scale)
    day, day_mask, week, week_mask = out[0].tolist()
    assert (day_mask, week_mask) == (1.0, 1.0)
    np.testing.assert_allclose(day * 100, n_hours - 24 + 0.5, rtol=1e-6)
    np.testing.assert_allclose(week * 100, n_hours - 168 + 0.5, rtol=1e-6)


def test_lags_older_than_the_memory_or_never_seen_are_absent() -> None:
    mem, rows = _memory(), torch.tensor([0])
    ones = torch.ones(1, 1, dtype=torch.bool)
    feat.seasonal_update(
        mem, rows, torch.tensor([T0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), ones
    )
    centre, scale = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    one_day_later = torch.tensor([T0 + 24 * HOUR], dtype=torch.float64)
    assert feat.seasonal_features(mem, rows, one_day_later, centre, scale)[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # Eight days later the slot still holds the old hour's mean, but stamped with another hour: absent.
    later = torch.tensor([T0 + 8 * 24 * HOUR], dtype=torch.float64)
    assert feat.seasonal_features(mem, rows, later, centre, scale)[0].tolist() == [0.0, 0.0, 0.0, 0.0]


def _seasonal_model(seed: int = 0) -> Forecaster:
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(hidden_size=8, seasonal=True))
    with torch.no_grad():  # random weights everywhere, so every input (lags included) matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_streaming_predictions_equal_the_training_forward_pass() -> None:
    """The scorer's seasonal memory and the training featurizer give the model identical inputs."""
    rng = np.random.default_rng(0)
    n = 9 * 24 * 12  # nine days at ~5 minutes: both lags become available
    ts = T0 + 300.0 * np.arange(n) + rng.uniform(0, 30, n)
    x = np.sin(2 * np.pi * ts / 86_400) + 0.1 * rng.standard_normal(n)
    x[rng.random(n) < 0.01] = np.nan  # missing readings (univariate: rejected as no_values)
    keep = np.isfinite(x)
    ts, x = ts[keep], x[keep]
    model = _seasonal_model()
    scorer = StreamScorer(model, ScorerConfig(adapt_lags=None))  # the model's own forecasts
    preds = np.empty(len(ts))
    for i in range(0, len(ts), 1):
        preds[i] = scorer.step(ReadingBatch(["d"], ts[i : i + 1], x[i : i + 1, None])).predicted[0, 0]
    feats, centre, scale = feat.featurize_sequence(
        torch.tensor(x)[None, :, None], torch.tensor(ts)[None], ScorerConfig(), seasonal=True
    )
    # level, mask, Δt | step, day lag, its mask, week lag, its mask
    assert feats.shape[-1] == model.config.input_size == 8
    assert float(feats[0, :, 5].mean()) > 0.8  # day lag present most of the time
    assert float(feats[0, :, 7].mean()) > 0.1  # week lag present in the last two days
    with torch.no_grad():
        mean, _, _ = model(feats)
    offline = (mean[0, :, 0].double() * scale[0, :, 0] + centre[0, :, 0]).numpy()
    np.testing.assert_allclose(preds[1:], offline[:-1], rtol=1e-5, atol=1e-5)


def test_only_seasonal_models_carry_the_memory_and_it_moves_with_the_device() -> None:
    plain = StreamScorer(Forecaster(ForecasterConfig(hidden_size=4)))
    assert not any(name.startswith("model_season.") for name in plain.layout.fields)
    scorer = StreamScorer(_seasonal_model())
    ts = T0 + 300.0 * np.arange(300)
    for i in range(300):
        scorer.step(ReadingBatch(["a", "b"], np.repeat(ts[i], 2), np.array([[1.0], [5.0]]) + i / 300))
    fork = scorer.fork(["a"])
    a = scorer.store.row_of("a")
    assert a is not None
    row = fork.store.row_of("a")
    assert row is not None
    mine, theirs = scorer.state_of("a"), fork.state_of("a")
    assert mine is not None
    assert theirs is not None
    assert float(np.abs(mine["model_season.count"]).sum()) > 0
    for name in ("model_season.mean", "model_season.count", "model_season.bin", "model_season.last_x"):
        np.testing.assert_array_equal(theirs[name], mine[name], err_msg=name)
    assert scorer.reset("a")
    assert scorer.store.row_of("a") is None
