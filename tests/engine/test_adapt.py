"""Online adaptation (``adapt_lags``): a per-device RLS correction of the forecast on the device's
own last values. It must make the residuals of a device the model does not know smaller, keep a
spike out of the forecasts after it, cope with missing channels, and be exactly the model when off."""

from __future__ import annotations

import numpy as np

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.scoring.components import adapt

ROWS = 3000
TS = 1_767_225_600.0 + 300.0 * np.arange(ROWS)


def level_with_noise(seed: int, channels: int = 1) -> np.ndarray:
    """White noise (σ 1) around a slow daily cycle: persistence's residual is σ√2, the mean of the
    last few readings' is close to σ."""
    rng = np.random.default_rng(seed)
    cycle = 5.0 * np.sin(2 * np.pi * np.arange(ROWS) / 288)[:, None]
    return 50.0 + cycle + rng.standard_normal((ROWS, channels))


def predictions(x: np.ndarray, config: ScorerConfig) -> np.ndarray:
    scorer = StreamScorer.builtin(channels=x.shape[1], config=config)
    out = np.full(x.shape, np.nan)
    for i in range(len(x)):
        out[i] = scorer.step(ReadingBatch(["d"], TS[i : i + 1], x[i : i + 1])).predicted[0]
    return out


def robust_sd(e: np.ndarray) -> float:
    e = e[np.isfinite(e)]
    return float(1.4826 * np.median(np.abs(e - np.median(e))))


def test_off_it_is_the_model_alone() -> None:
    x = level_with_noise(0)[:400]
    p = predictions(x, ScorerConfig(adapt_lags=None))
    np.testing.assert_allclose(p[1:, 0], x[:-1, 0], rtol=1e-6)  # the built-in model: persistence


def test_it_learns_a_device_the_model_does_not_know() -> None:
    for seed in range(2):
        x = level_with_noise(seed)
        off = robust_sd((x - predictions(x, ScorerConfig(adapt_lags=None)))[500:, 0])
        on = robust_sd((x - predictions(x, ScorerConfig()))[500:, 0])
        assert 1.3 < off < 1.55  # persistence: σ√2
        assert on < 0.88 * off, (on, off)


def test_a_spike_stays_out_of_the_forecasts_after_it() -> None:
    x = level_with_noise(3)
    x[2000] += 80.0
    p = predictions(x, ScorerConfig())
    model_next = x[2000, 0]  # persistence forecasts the spike itself for the next reading
    level = np.median(x[1990:2000, 0])
    # The correction pulls the next forecast back towards the level: a lag holds the spike clipped
    # to LAG_CLIP units of its forecast, and the correction is at most CORRECTION_CLIP units.
    assert abs(p[2001, 0] - level) < abs(model_next - level) - 1.0
    # ... and once the spike has left the lags, the forecasts are back to normal.
    after = x[2006:2100, 0] - p[2006:2100, 0]
    assert np.abs(after).max() < 6.0, np.abs(after).max()


def test_missing_channels_keep_forecasts_finite() -> None:
    x = level_with_noise(4, channels=3)
    rng = np.random.default_rng(5)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[np.isnan(x).all(axis=1), 0] = 50.0  # a reading with nothing in it would just be rejected
    p = predictions(x, ScorerConfig())
    assert np.isfinite(p[10:]).all()
    e = (x - p)[500:]
    off = x - predictions(x, ScorerConfig(adapt_lags=None))
    for j in range(3):
        assert robust_sd(e[:, j]) < robust_sd(off[500:, j]), j


def test_the_state_is_declared_per_channel_and_lag() -> None:
    from sensorwatch.model.forecaster import ForecasterConfig
    from sensorwatch.scoring.components import Setup, layout

    lay = layout(Setup(ScorerConfig(adapt_lags=3), ForecasterConfig(channels=2)))
    assert lay.fields["adapt.weights"][2] == (2, 3)
    assert lay.fields["adapt.gain"][2] == (2, 3, 3)
    assert "adapt.weights" not in layout(Setup(ScorerConfig(adapt_lags=None), ForecasterConfig())).fields
    assert adapt.TRACE_CAP > 0
