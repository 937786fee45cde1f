"""The fused scoring step: every component of one wave of readings in one compiled call.

A *wave* holds at most one reading per device. :func:`wave` runs, for each of its readings, the
components in order — bookkeeping, forecast residuals, seasonal check, likelihood, range and stuck
checks, alert filter, decision, dynamic threshold — then builds the forecaster's input features
(normaliser, Δt, seasonal model inputs). The scorer then makes one batched forecaster call for the
whole wave and :func:`store_predictions` keeps the forecasts for the next reading.

Why numba (measured on this 2-core VM, ``docs/scoring-core.md``): the torch implementation spent
~1.1 ms per step in ~200 small tensor ops whatever the batch size (one device: ~900 readings/s);
numpy ops on preallocated buffers still cost ~1 µs each (~200 µs a step); a compiled loop over the
readings costs a few µs per call plus ~0.2 µs per reading. Special functions are SciPy's own, called
through their C entry points (:mod:`~sensorwatch.scoring.components.special`).

State: ``st`` is the batch's working copy of the ``state`` rows (``loc`` indexes it); the memory
rings are the store's own arrays (``srow`` indexes them), written in place through an undo log.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from sensorwatch.scoring.components import COMPONENTS, Setup, model_season, offsets
from sensorwatch.scoring.components import alert_filter as alert_filter_c
from sensorwatch.scoring.components import core as core_c
from sensorwatch.scoring.components import forecast as forecast_c
from sensorwatch.scoring.components import normaliser as normaliser_c
from sensorwatch.scoring.components import point as point_c
from sensorwatch.scoring.components import range_check as range_c
from sensorwatch.scoring.components import seasonal_check as seasonal_c
from sensorwatch.scoring.components import stuck_check as stuck_c
from sensorwatch.scoring.components import threshold as threshold_c
from sensorwatch.scoring.components.common import LN10, LOG_2, MEM32, jit, raw_score, surprise_to_likelihood
from sensorwatch.scoring.components.decision import decide
from sensorwatch.scoring.components.likelihood import commit, short_term_tail
from sensorwatch.scoring.features import season_slots
from sensorwatch.scoring.state import Layout

#: The scorer's settings as the kernel reads them (flags, windows, constants derived once).
Params = namedtuple(  # noqa: PYI024
    "Params",
    [
        "channels", "warmup", "score_c", "max_gap_s", "recalibrate", "recalibrate_window",
        "dt_window", "dt_clip", "norm_window", "std_floor_rel", "std_floor_abs", "smoothing_alpha",
        "likelihood_short", "likelihood_long", "likelihood_std_floor", "likelihood_threshold",
        "episode_cut", "range_check", "range_margin", "range_warmup", "point_likelihood",
        "stuck_check", "stuck_cut", "seasonal_check", "seasonal_period_s", "seasonal_bin_s",
        "seasonal_level_alpha", "seasonal_lag", "seasonal_slots", "seasonal_window", "alert_filter",
        "filter_red", "filter_yellow", "threshold_calibrator", "threshold_window", "threshold_every",
        "max_sequences", "prune_p", "min_threshold", "model_seasonal", "model_bin_s",
        "model_day_lag", "model_week_lag", "model_slots", "features",
    ],
)
#: Every component's offsets named tuple, by component name.
Offsets = namedtuple("Offsets", [m.NAME for m in COMPONENTS])  # noqa: PYI024


def params(setup: Setup, features: int) -> Params:
    cfg, model = setup.cfg, setup.model
    day, week = model_season.lags(setup)
    return Params(
        channels=model.channels,
        warmup=int(cfg.warmup),
        score_c=float(cfg.score_c),
        max_gap_s=math.inf if cfg.max_gap_s is None else float(cfg.max_gap_s),
        recalibrate=cfg.recalibrate_window is not None,
        recalibrate_window=float(cfg.recalibrate_window or 1),
        dt_window=float(cfg.dt_window),
        dt_clip=float(cfg.dt_clip),
        norm_window=float(cfg.norm_window),
        std_floor_rel=float(cfg.std_floor_rel),
        std_floor_abs=float(cfg.std_floor_abs),
        smoothing_alpha=float(cfg.smoothing_alpha),
        likelihood_short=int(cfg.likelihood_short),
        likelihood_long=float(cfg.likelihood_long),
        likelihood_std_floor=float(cfg.likelihood_std_floor),
        likelihood_threshold=float(cfg.likelihood_threshold),
        episode_cut=-math.log10(1.0 - cfg.likelihood_threshold),
        range_check=cfg.range_margin is not None,
        range_margin=float(cfg.range_margin or 0.0),
        range_warmup=float(cfg.range_warmup),
        point_likelihood=bool(cfg.point_likelihood),
        stuck_check=bool(cfg.stuck_check),
        stuck_cut=math.log1p(-cfg.likelihood_threshold),
        seasonal_check=bool(cfg.seasonal_check),
        seasonal_period_s=float(cfg.seasonal_period_s),
        seasonal_bin_s=float(cfg.seasonal_bin_s),
        seasonal_level_alpha=float(cfg.seasonal_level_alpha),
        seasonal_lag=int(round(cfg.seasonal_period_s / cfg.seasonal_bin_s)),
        seasonal_slots=int(season_slots(cfg.seasonal_bin_s, cfg.seasonal_period_s)),
        seasonal_window=float(cfg.recalibrate_window or 1000),
        alert_filter=bool(cfg.alert_filter),
        filter_red=float(cfg.filter_red),
        filter_yellow=float(cfg.filter_yellow),
        threshold_calibrator=cfg.calibrator == "threshold",
        threshold_window=int(cfg.threshold_window),
        threshold_every=int(cfg.threshold_every),
        max_sequences=int(cfg.max_sequences),
        prune_p=float(cfg.prune_p),
        min_threshold=float(cfg.min_threshold),
        model_seasonal=bool(model.seasonal),
        model_bin_s=float(model.season_bin_s),
        model_day_lag=int(day),
        model_week_lag=int(week),
        model_slots=int(season_slots(model.season_bin_s)),
        features=int(features),
    )


def build_offsets(setup: Setup, lay: Layout) -> Offsets:
    return Offsets(**offsets(setup, lay))


#: Per-wave outputs the kernel fills at each reading's batch position.
Outputs = namedtuple(  # noqa: PYI024
    "Outputs",
    ["predicted", "z", "raw_score", "smoothed_score", "threshold", "likelihood", "is_anomaly",
     "attribution", "warming_up"],
)


def undo_log(capacity: int) -> tuple[np.ndarray, ...]:
    """(store, row, column, old value, count) arrays for ``capacity`` memory writes."""
    return (
        np.zeros(capacity, dtype=np.int8),
        np.zeros(capacity, dtype=np.int64),
        np.zeros(capacity, dtype=np.int64),
        np.zeros(capacity, dtype=np.float64),
        np.zeros(1, dtype=np.int64),
    )


def writes_per_reading(setup: Setup) -> int:
    """Most memory writes one reading makes (sizes the undo log)."""
    c = setup.model.channels
    return (2 * c + 1) * (int(setup.cfg.seasonal_check) + int(setup.model.seasonal)) + 1


@jit
def rollback(mem32, mem64, undo) -> None:  # type: ignore[no-untyped-def]
    """Undo every logged memory write, newest first."""
    kind, row, col, val, n = undo
    for k in range(n[0] - 1, -1, -1):
        if kind[k] == MEM32:
            mem32[row[k], col[k]] = val[k]
        else:
            mem64[row[k], col[k]] = val[k]
    n[0] = 0


@jit
def wave(st, loc, mem32, mem64, srow, sel, xs, tss, P, O, zs, feats, centre, scale, gaps, out, undo) -> None:  # type: ignore[no-untyped-def]  # noqa: E501
    """Score the readings ``sel`` (batch positions) of one wave and build their model inputs.

    Reading ``i`` is ``xs[sel[i]]`` at ``tss[sel[i]]`` of the device whose state row is
    ``st[loc[i]]`` and memory row ``srow[i]``. Fills ``feats[i]`` (float32), ``centre[i]``,
    ``scale[i]`` (normalised → raw units), ``gaps[i]`` and the ``out`` columns at ``sel[i]``.
    """
    c = P.channels
    x, z, norm_scale, attr = np.empty(c), np.empty(c), np.empty(c), np.empty(c)
    sx_z, sx_attr, ref, x_filled, x_norm = np.empty(c), np.empty(c), np.empty(c), np.empty(c), np.empty(c)
    observed, scored = np.empty(c, np.bool_), np.empty(c, np.bool_)
    sx_scored, present, remember = np.empty(c, np.bool_), np.empty(c, np.bool_), np.empty(c, np.bool_)
    e_thr = np.empty(max(P.threshold_window, 1))
    extra = np.empty(5 * c)
    oc, of, on, ol = O.core, O.forecast, O.normaliser, O.likelihood
    for i in range(loc.size):
        row, m, b = st[loc[i]], srow[i], sel[i]
        ts = tss[b]
        for j in range(c):
            x[j] = xs[b, j]
            observed[j] = not math.isnan(x[j])
        # 1. bookkeeping: gap reset, warm-up
        dt, gap, has_pred, since, warming = core_c.begin(row, oc, ts, P.max_gap_s, P.warmup)
        armed = not warming
        # 2. forecast residuals on the device's own scale, and their raw score
        for j in range(c):
            norm_scale[j] = normaliser_c.scale_before(row, on, j, P.std_floor_abs, P.std_floor_rel)
        forecast_c.residuals(row, of, x, observed, has_pred, armed, norm_scale, P.recalibrate,
                             P.recalibrate_window, z, scored)
        raw = raw_score(z, scored, P.score_c, attr)
        # 3. seasonal check: its own residuals and raw score
        sx_raw, sx_any = 0.0, False
        if P.seasonal_check:
            seasonal_c.residuals(row, O.seasonal_check, mem32, mem64, m, ts, x, observed, P, sx_z, sx_scored,
                                 ref, present, remember, undo)
            sx_raw = raw_score(sx_z, sx_scored, P.score_c, sx_attr)
            for j in range(c):
                sx_any = sx_any or sx_scored[j]
        # 4. likelihood of the forecast's raw scores (and the seasonal check's)
        n = row[ol.count]
        smoothed = raw if n == 0 else P.smoothing_alpha * raw + (1.0 - P.smoothing_alpha) * row[ol.smoothed]
        log_short, l_mean, l_var = short_term_tail(row, ol.short_ring, ol.long_mean, ol.long_var, raw, n, P)
        seasonal_won = False
        if P.seasonal_check:
            os_ = O.seasonal_check
            sx = sx_any and has_pred
            sx_n = row[os_.scores]
            log_sx, s_mean, s_var = short_term_tail(row, os_.short_ring, os_.long_mean, os_.long_var, sx_raw,
                                                    sx_n, P)
            if sx:
                commit(row, os_.short_ring, os_.long_mean, os_.long_var, sx_raw, sx_n, s_mean, s_var,
                       P.likelihood_short)
                row[os_.scores] = sx_n + 1.0
            # It speaks once it has seen a full period of its own scores (at least warm-up).
            if row[on.dt_count] > 0:
                need = max(P.seasonal_period_s / math.exp(row[on.dt_log_mean]), float(P.warmup))
            else:
                need = math.inf
            if sx and sx_n >= need:
                seasonal_won = log_sx < log_short
                log_short = min(min(log_short, log_sx) + LOG_2, 0.0)
        surprise = -log_short / LN10
        if P.point_likelihood:
            surprise = max(surprise, -point_c.log_tail(raw, P.score_c) / LN10)
        # 5. hard checks: range, stuck
        out_of_range = False
        if P.range_check:
            out_of_range = range_c.check(row, O.range_check, x, observed, armed and n >= P.range_warmup,
                                         P.range_margin)
        hard = out_of_range
        if P.stuck_check:
            log_stuck = stuck_c.log_tail(row, O.stuck_check, x, observed, P.norm_window)
            if not armed:
                log_stuck = 0.0
            hard = hard or log_stuck <= P.stuck_cut
            surprise = max(surprise, -log_stuck / LN10)
        if out_of_range:
            surprise = math.inf
        # 6. alert filter, likelihood
        previous_s = 0.0
        remembered = 0.0
        if P.alert_filter:
            previous_s = row[O.alert_filter.previous_surprise]
            surprise, remembered = alert_filter_c.apply(surprise, previous_s, P.filter_red, P.filter_yellow)
        likelihood = surprise_to_likelihood(surprise)
        if has_pred:
            row[ol.count] = n + 1.0
            row[ol.smoothed] = smoothed
            commit(row, ol.short_ring, ol.long_mean, ol.long_var, raw, n, l_mean, l_var, P.likelihood_short)
            if P.alert_filter:
                row[O.alert_filter.previous_surprise] = remembered
        else:
            likelihood, smoothed = 0.0, 0.0
        # 7. decision, dynamic threshold
        epsilon = row[O.threshold.epsilon] if P.threshold_calibrator else math.inf
        out.is_anomaly[b] = decide(P, likelihood, smoothed, epsilon, hard, previous_s, has_pred, armed)
        if P.threshold_calibrator and has_pred:
            threshold_c.update(row, O.threshold, mem32, m, smoothed, n + 1.0, P, zs, e_thr, undo)
        out.threshold[b] = epsilon if P.threshold_calibrator else P.likelihood_threshold
        out.likelihood[b] = likelihood
        out.smoothed_score[b] = smoothed
        out.raw_score[b] = raw if has_pred else 0.0
        out.warming_up[b] = warming
        for j in range(c):
            out.predicted[b, j] = row[of.pred_mean + j] if has_pred else math.nan
            out.z[b, j] = z[j] if scored[j] else math.nan
            out.attribution[b, j] = sx_attr[j] if seasonal_won else attr[j]
        # 8. the forecaster's inputs; missing channels imputed with the prediction (running mean before)
        for j in range(c):
            if observed[j]:
                x_filled[j] = x[j]
            else:
                x_filled[j] = row[of.pred_mean + j] if has_pred else row[on.mean + j]
        normaliser_c.normalise(row, on, x_filled, observed, P.norm_window, P.std_floor_abs, P.std_floor_rel,
                               x_norm, centre[i], scale[i])
        dt_feat = normaliser_c.delta_t(row, on, dt, not gap, P.dt_window, P.dt_clip)
        f = feats[i]
        for j in range(c):
            f[j] = x_norm[j]
            f[c + j] = 1.0 if observed[j] else 0.0
        f[2 * c] = dt_feat
        if P.model_seasonal:
            typical = math.exp(row[on.dt_log_mean]) if row[on.dt_count] > 0 else 0.0
            model_season.inputs(row, O.model_season, mem32, mem64, m, ts, ts + typical, x, x_filled, observed,
                                scale[i], gap, P, extra, ref, present, undo)
            for k in range(5 * c):
                f[2 * c + 1 + k] = extra[k]
        core_c.finish(row, oc, ts, since, has_pred, likelihood)
        gaps[i] = gap


@jit
def store_predictions(st, loc, O, mean_n, scale_n, centre, scale) -> None:  # type: ignore[no-untyped-def]
    """Keep the wave's forecasts (float32, normalised units) in raw units for the next reading."""
    for i in range(loc.size):
        forecast_c.store_prediction(st[loc[i]], O.forecast, mean_n[i], scale_n[i], centre[i], scale[i])
