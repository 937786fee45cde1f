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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.state.store import ColumnSpec

F64 = torch.float64


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
    scale = torch.sqrt(var).clamp_min(cfg.std_floor_abs)
    scale = torch.maximum(scale, cfg.std_floor_rel * mean.abs())
    x_norm = (x - mean) / scale
    return x_norm, mean, scale, {"norm_n": n, "norm_mean": mean, "norm_var": var}


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


def assemble(x_norm: torch.Tensor, observed: torch.Tensor, dt_feat: torch.Tensor) -> torch.Tensor:
    """Model input (B, 2C+1) float32: normalised values, mask, Δt feature."""
    return torch.cat([x_norm, observed.to(F64), dt_feat[:, None]], dim=1).to(torch.float32)


def featurize_sequence(
    values: torch.Tensor, ts: torch.Tensor, cfg: ScorerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of whole sequences, exactly as streaming computes them step by step.

    ``values`` (B, T, C) float64 with NaN for missing channels, ``ts`` (B, T) seconds. Missing
    channels are imputed with the running mean (training has no forecaster in the loop; streaming
    imputes with the prediction). Returns ``features`` (B, T, 2C+1) and the per-step ``centre`` and
    ``scale`` (B, T, C) that convert normalised predictions back to raw units. Padded steps (beyond a
    sequence's length) may hold anything; callers mask them.
    """
    b, t, c = values.shape
    rows = {k: torch.zeros((b, *s.shape), dtype=s.dtype) for k, s in feature_columns(c).items()}
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
        feats.append(assemble(x_norm, observed, dt_feat))
        centres.append(centre)
        scales.append(scale)
    return torch.stack(feats, 1), torch.stack(centres, 1), torch.stack(scales, 1)
