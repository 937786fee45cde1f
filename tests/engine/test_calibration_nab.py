"""Calibration details behind the NAB evaluation: an order-preserving likelihood without ties,
per-device empirical recalibration of surprises and one alert per episode (Numenta's filter)."""

from __future__ import annotations

import math

import torch

from sensorwatch.scoring import calibration as cal
from sensorwatch.scoring.config import ScorerConfig


def test_likelihood_is_exact_below_eight_digits_and_never_saturates() -> None:
    s = torch.tensor([0.0, 1.0, 4.0, 8.0], dtype=torch.float64)
    lik = cal.surprise_to_likelihood(s)
    torch.testing.assert_close(lik, 1 - 10 ** (-s))
    big = torch.tensor([8.5, 9.0, 20.0, 65.0, 300.0, 1e4], dtype=torch.float64)
    lik_big = cal.surprise_to_likelihood(big)
    assert (lik_big < 1.0).all()
    assert (torch.diff(lik_big) > 0).all()  # strictly increasing: no ties in float64
    assert cal.surprise_to_likelihood(torch.tensor([math.inf], dtype=torch.float64)).item() == 1.0
    # The default decision cut 0.9999 is a surprise of 4 decimal digits.
    assert math.isclose(-math.log10(1 - ScorerConfig().likelihood_threshold), 4.0, rel_tol=1e-9)


def _rows(cfg: ScorerConfig, b: int) -> dict[str, torch.Tensor]:
    cols = cal.calibration_columns(1, cfg)
    return {k: c.allocate(b) for k, c in cols.items()}


def test_empirical_surprise_discounts_a_device_that_is_always_surprised() -> None:
    cfg = ScorerConfig(empirical_surprise=True)
    rows = _rows(cfg, 2)
    k = rows["s_max"].shape[1]
    learn = torch.ones(2, dtype=torch.bool)
    for _ in range(500):
        # Device 0 sees a surprise of 10 digits on every reading; device 1 sees 0.
        s = torch.tensor([[10.0] * k, [0.0] * k], dtype=torch.float64)
        out, upd = cal.empirical_surprise(rows, s, learn, cfg)
        rows.update(upd)
    assert rows["s_n"].tolist() == [500.0, 500.0]
    probe = torch.tensor([[10.0] * k, [10.0] * k], dtype=torch.float64)
    out, _ = cal.empirical_surprise(rows, probe, learn, cfg)
    assert out[0, 0] < 0.5  # routine for device 0
    assert out[1, 0] > math.log10(501)  # beyond anything device 1 has seen


def _episode(alert_filter: bool, flags: list[bool] | None = None) -> list[float]:
    cfg = ScorerConfig(alert_filter=alert_filter, stuck_check=False, range_margin=None)
    rows = _rows(cfg, 1)
    liks = []
    for i in range(300):
        # A sustained deviation from reading 200 on: the short-term mean stays high for a while.
        raw = 0.999 if 200 <= i < 206 else 0.01 * (i % 7) / 7
        co = cal.calibrate(
            rows,
            torch.tensor([raw], dtype=torch.float64),
            torch.zeros(1, 1, dtype=torch.float64),
            torch.ones(1, 1, dtype=torch.bool),
            torch.ones(1, dtype=torch.bool),
            torch.ones(1, dtype=torch.bool),
            cfg,
        )
        rows = co.rows
        liks.append(co.likelihood.item())
        if flags is not None:
            flags.append(bool(co.decision.item()))
    return liks


def test_alert_filter_keeps_the_first_red_reading_of_a_run() -> None:
    cfg = ScorerConfig()
    on = -torch.log10(1 - torch.tensor(_episode(True)[195:215], dtype=torch.float64))
    off = -torch.log10(1 - torch.tensor(_episode(False)[195:215], dtype=torch.float64))
    red = off >= cfg.filter_red
    assert red.sum() >= 3  # the unfiltered run has several red readings in a row
    first = int(torch.nonzero(red)[0])
    assert on[first] == off[first]  # the first alert of the run stands
    follow = red.clone()
    follow[first] = False
    follow &= torch.roll(red, 1)
    assert (on[follow] < cfg.filter_yellow).all()  # the rest of the run is lowered below yellow
    assert (on[~follow] == off[~follow]).all()  # nothing else changes
    # Order among lowered readings is kept (no ties created by the filter).
    assert torch.equal(torch.argsort(on[follow]), torch.argsort(off[follow]))


def test_one_flag_per_episode_at_the_decision_cut() -> None:
    """With the filter, is_anomaly marks the first reading of a run that is at least as surprising as
    the decision cut (4 digits), not every reading of it — also where the run stays below red (5)."""
    on: list[bool] = []
    off: list[bool] = []
    lik_off = _episode(False, off)
    _episode(True, on)
    cut = ScorerConfig().likelihood_threshold
    above = [lik >= cut for lik in lik_off]
    assert sum(above[195:215]) >= 3
    assert sum(off[195:215]) == sum(above[195:215])
    first = above.index(True, 195)
    assert on[first]
    assert sum(on[195:215]) == 1
