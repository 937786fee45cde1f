"""Model inputs from raw readings: per-device running normalisation, missing-value mask and Δt feature.

The same functions serve streaming (one step for a batch of devices) and training (a loop over the
time axis of padded sequences, :func:`featurize_sequence`), so a model sees exactly the same features
in both. All statistics are float64; features are float32.

Normaliser: per channel an exponentially weighted mean/variance whose weight is ``1/n`` for the first
``norm_window`` observations (the exact running mean) and ``1/norm_window`` after; the std is floored
(relative to |mean| and absolutely) so flat series stay finite. The current reading is included
before it is normalised, so a device's first reading maps to 0.

Δt feature: ``log(Δt) − mean log(Δt)`` of the device, clipped — scale-free, so a 1 s sensor and a
5 min sensor look alike; 0 for a device's first reading.

Seasonal models (``seasonal=True``) are also *level-free*: their recurrent network never sees the
normalised level itself (a running mean is a poor guess of a real sensor's level, and a network that
sees it learns mean reversion), only the step since the previous reading and, as seasonal context,
the device's mean reading in the clock hour one day and one week before the next reading is
expected — relative to the current reading, in normaliser units, with presence masks
(DETECTION-NOTES measured such lags at +10 NAB points for a one-step forecaster).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.state.store import ColumnSpec

F64 = torch.float64

#: Seasonal memory of models built with ``seasonal=True``: per device and channel, the mean reading of
#: each time bin (``season_bin_s``, default one clock hour) over the last week plus one bin, so that the
#: slot one week before the bin being predicted is never the one being filled. Memory with hourly
#: bins: 169 × (4 + 4) bytes per channel plus 169 × 8 per device — about 2.7 KB for a univariate
#: device (5-minute bins: 2,017 slots, about 32 KB).
SEASON_BIN_S = 3600.0
DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
#: Clip of a normalised seasonal value (a value far outside the current normaliser's range).
SEASON_CLIP = 10.0


def feature_columns(channels: int) -> dict[str, ColumnSpec]:
    """Per-device state the featurizer keeps."""
    return {
        "norm_n": ColumnSpec((channels,), F64),
        "norm_mean": ColumnSpec((channels,), F64),
        "norm_var": ColumnSpec((channels,), F64),
        "dt_n": ColumnSpec((), F64),
        "dt_logmean": ColumnSpec((), F64),
    }


def normalise(
    rows: Mapping[str, torch.Tensor], x: torch.Tensor, observed: torch.Tensor, cfg: ScorerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Update the normaliser with the observed channels of ``x`` (B, C) and normalise ``x``.

    Returns ``(x_norm, centre, scale, new_rows)``; ``centre``/``scale`` map normalised units back to
    raw ones (``raw = norm·scale + centre``). Missing channels leave their statistics unchanged.
    """
    n = rows["norm_n"] + observed.to(F64)
    alpha = torch.where(observed, 1.0 / torch.clamp(n, max=cfg.norm_window), torch.zeros_like(n))
    x_obs = torch.where(observed, x, rows["norm_mean"])
    delta = x_obs - rows["norm_mean"]
    mean = rows["norm_mean"] + alpha * delta
    var = (1.0 - alpha) * (rows["norm_var"] + alpha * delta * delta)
    scale = floored_std(torch.sqrt(var), mean, cfg)
    x_norm = (x - mean) / scale
    return x_norm, mean, scale, {"norm_n": n, "norm_mean": mean, "norm_var": var}


def floored_std(std: torch.Tensor, level: torch.Tensor, cfg: ScorerConfig) -> torch.Tensor:
    """``std`` floored absolutely (``std_floor_abs``) and relative to ``|level|`` (``std_floor_rel``),
    so flat series keep a finite scale."""
    return torch.maximum(std.clamp_min(cfg.std_floor_abs), cfg.std_floor_rel * level.abs())


def delta_t_feature(
    rows: Mapping[str, torch.Tensor], dt: torch.Tensor, learn: torch.Tensor, cfg: ScorerConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δt feature for ``dt`` (B,) seconds (NaN for a first reading); ``learn`` masks the readings that
    update the typical interval (not first readings, not gap resets)."""
    has_dt = torch.isfinite(dt) & (dt > 0)
    logdt = torch.log(torch.where(has_dt, dt, torch.ones_like(dt)))
    known = rows["dt_n"] > 0
    feat = torch.where(has_dt & known, logdt - rows["dt_logmean"], torch.zeros_like(dt)).clamp(
        -cfg.dt_clip, cfg.dt_clip
    )
    learn = learn & has_dt
    n = rows["dt_n"] + learn.to(F64)
    alpha = torch.where(learn, 1.0 / torch.clamp(n, min=1, max=cfg.dt_window), torch.zeros_like(n))
    logmean = rows["dt_logmean"] + alpha * (logdt - rows["dt_logmean"])
    return feat, {"dt_n": n, "dt_logmean": logmean}


def assemble(
    x_norm: torch.Tensor, observed: torch.Tensor, dt_feat: torch.Tensor, seasonal: torch.Tensor | None = None
) -> torch.Tensor:
    """Model input float32: normalised values, mask, Δt feature (B, 2C+1), then for seasonal models
    the step since the previous reading (C) and the day/week-lag values and masks (4C)."""
    parts = [x_norm, observed.to(F64), dt_feat[:, None]]
    if seasonal is not None:
        parts.append(seasonal)
    return torch.cat(parts, dim=1).to(torch.float32)


def featurize_sequence(
    values: torch.Tensor,
    ts: torch.Tensor,
    cfg: ScorerConfig,
    seasonal: bool = False,
    season_bin_s: float = SEASON_BIN_S,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of whole sequences, exactly as streaming computes them step by step.

    ``values`` (B, T, C) float64 with NaN for missing channels, ``ts`` (B, T) seconds. Missing
    channels are imputed with the running mean (training has no forecaster in the loop; streaming
    imputes with the prediction). Returns ``features`` (B, T, 2C+1) and the per-step ``centre`` and
    ``scale`` (B, T, C) that convert normalised predictions back to raw units. Padded steps (beyond a
    sequence's length) may hold anything; callers mask them. With ``seasonal`` the day/week-lag
    features are appended (``4C`` more), from the same seasonal memory as streaming.
    """
    b, t, c = values.shape
    rows = {k: spec.allocate(b) for k, spec in feature_columns(c).items()}
    if seasonal:
        sea = {k: spec.allocate(b) for k, spec in seasonal_columns(c, season_bin_s).items()}
        rows.update({k: spec.allocate(b) for k, spec in level_free_columns(c).items()})
        idx = torch.arange(b)
    feats, centres, scales = [], [], []
    prev_ts = torch.full((b,), float("nan"), dtype=F64)
    for i in range(t):
        x = values[:, i].to(F64)
        observed = torch.isfinite(x)
        x_filled = torch.where(observed, x, rows["norm_mean"])
        x_norm, centre, scale, upd = normalise(rows, x_filled, observed, cfg)
        rows.update(upd)
        dt = ts[:, i].to(F64) - prev_ts
        dt_feat, upd = delta_t_feature(rows, dt, torch.isfinite(dt), cfg)
        rows.update(upd)
        prev_ts = ts[:, i].to(F64)
        extra = None
        if seasonal:
            extra, upd = seasonal_inputs(sea, idx, rows, prev_ts, x, x_filled, observed, scale, season_bin_s)
            rows.update(upd)
        feats.append(assemble(x_norm, observed, dt_feat, extra))
        centres.append(centre)
        scales.append(scale)
    return torch.stack(feats, 1), torch.stack(centres, 1), torch.stack(scales, 1)


# ---------------------------------------------------------------------------------------------- seasonal
def season_slots(bin_s: float = SEASON_BIN_S, span_s: float = WEEK_S) -> int:
    """Slots of a seasonal ring: ``span_s`` of bins plus one (so the slot one span before the bin
    being filled is never the one being filled).

    >>> season_slots(3600.0), season_slots(300.0), season_slots(3600.0, DAY_S)
    (169, 2017, 25)
    """
    return round(span_s / bin_s) + 1


def season_lags(bin_s: float = SEASON_BIN_S) -> tuple[int, int]:
    """Lags in bins fed to the model: one day and one week before the bin of the next reading."""
    return round(DAY_S / bin_s), round(WEEK_S / bin_s)


def level_free_columns(channels: int) -> dict[str, ColumnSpec]:
    """The previous (observed or imputed) reading, for the step feature of seasonal models."""
    return {"last_x": ColumnSpec((channels,), F64, math.nan)}


def step_feature(
    rows: Mapping[str, torch.Tensor], x_filled: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x − previous x) / scale (B, C), 0 for a first reading, clipped; and the new ``last_x``."""
    prev = rows["last_x"]
    step = torch.where(torch.isfinite(prev), (x_filled - prev) / scale, 0.0).clamp(-SEASON_CLIP, SEASON_CLIP)
    return step, {"last_x": x_filled}


def seasonal_columns(
    channels: int, bin_s: float = SEASON_BIN_S, span_s: float = WEEK_S, prefix: str = "sea"
) -> dict[str, ColumnSpec]:
    """Per-device ring of bin means over ``span_s`` (updated in place: the scorer never gathers it
    whole). ``prefix`` names the columns, so that several rings can live in one store."""
    slots = season_slots(bin_s, span_s)
    return {
        f"{prefix}_mean": ColumnSpec((slots, channels), torch.float32),
        f"{prefix}_cnt": ColumnSpec((slots, channels), torch.float32),
        f"{prefix}_bin": ColumnSpec((slots,), F64, -1.0),
    }


SEASONAL_COLUMNS = frozenset(seasonal_columns(1))


def seasonal_update(
    cols: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    ts: torch.Tensor,
    x: torch.Tensor,
    observed: torch.Tensor,
    bin_s: float = SEASON_BIN_S,
    prefix: str = "sea",
) -> None:
    """Fold readings ``x`` (B, C) at ``ts`` (B,) into the bin means of devices ``rows`` (B,, distinct),
    in place. A slot last written for another bin is restarted."""
    means, counts, bins = cols[f"{prefix}_mean"], cols[f"{prefix}_cnt"], cols[f"{prefix}_bin"]
    k = torch.floor(ts / bin_s)
    slot = torch.remainder(k, bins.shape[1]).long()
    stale = bins[rows, slot] != k
    cnt_old = torch.where(stale[:, None], 0.0, counts[rows, slot].to(F64))
    mean_old = torch.where(stale[:, None], 0.0, means[rows, slot].to(F64))
    cnt = cnt_old + observed.to(F64)
    mean = torch.where(observed, mean_old + (x - mean_old) / cnt.clamp_min(1.0), mean_old)
    means[rows, slot] = mean.to(torch.float32)
    counts[rows, slot] = cnt.to(torch.float32)
    bins[rows, slot] = k


def seasonal_lookup(
    cols: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    ts: torch.Tensor,
    lag: int,
    bin_s: float = SEASON_BIN_S,
    prefix: str = "sea",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (B, C) float64 of the bin ``lag`` bins before the bin of ``ts`` (B,), and whether that
    bin holds readings of each channel (B, C) — False once its slot was reused for a later bin."""
    means, counts, bins = cols[f"{prefix}_mean"], cols[f"{prefix}_cnt"], cols[f"{prefix}_bin"]
    b = torch.floor(ts / bin_s) - lag
    slot = torch.remainder(b, bins.shape[1]).long()
    present = (bins[rows, slot] == b)[:, None] & (counts[rows, slot] > 0)
    return means[rows, slot].to(F64), present


def seasonal_features(
    cols: Mapping[str, torch.Tensor],
    rows: torch.Tensor,
    target_ts: torch.Tensor,
    ref: torch.Tensor,
    scale: torch.Tensor,
    bin_s: float = SEASON_BIN_S,
) -> torch.Tensor:
    """(B, 4C) float64: for each lag of :func:`season_lags`, the bin's mean that long before
    ``target_ts`` relative to ``ref`` (the current reading) in normaliser units (0 when unknown),
    and its presence mask."""
    parts = []
    for lag in season_lags(bin_s):
        m, present = seasonal_lookup(cols, rows, target_ts, lag, bin_s)
        v = torch.where(present, ((m - ref) / scale).clamp(-SEASON_CLIP, SEASON_CLIP), 0.0)
        parts += [v, present.to(F64)]
    return torch.cat(parts, 1)


def seasonal_inputs(
    memory: Mapping[str, torch.Tensor],
    idx: torch.Tensor,
    rows: Mapping[str, torch.Tensor],
    ts: torch.Tensor,
    x: torch.Tensor,
    x_filled: torch.Tensor,
    observed: torch.Tensor,
    scale: torch.Tensor,
    bin_s: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The extra inputs of a seasonal model for one step — streaming and training alike.

    Folds the readings into the seasonal ``memory`` of devices ``idx`` (in place) and returns the
    step since the previous reading and the day/week lags of the next reading (B, 5C), and the new
    ``last_x``. ``rows`` holds ``last_x`` (NaN: step unknown) and the already updated Δt state.
    """
    step, upd = step_feature(rows, x_filled, scale)
    seasonal_update(memory, idx, ts, x, observed, bin_s)
    lags = seasonal_features(memory, idx, next_reading_ts(ts, rows), x_filled, scale, bin_s)
    return torch.cat([step, lags], 1), upd


def next_reading_ts(ts: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """When the next reading is expected: ``ts`` plus the device's typical interval (``ts`` itself
    before an interval is known)."""
    typical = torch.where(rows["dt_n"] > 0, torch.exp(rows["dt_logmean"]), torch.zeros_like(ts))
    return ts + typical
