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
import os
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from sensorwatch.scoring.batch import RejectReason
from sensorwatch.scoring.components import Setup, model_season
from sensorwatch.scoring.components import adapt as adapt_c
from sensorwatch.scoring.components import alert_filter as alert_filter_c
from sensorwatch.scoring.components import core as core_c
from sensorwatch.scoring.components import episode as episode_c
from sensorwatch.scoring.components import forecast as forecast_c
from sensorwatch.scoring.components import normaliser as normaliser_c
from sensorwatch.scoring.components import point as point_c
from sensorwatch.scoring.components import range_check as range_c
from sensorwatch.scoring.components import seasonal_check as seasonal_c
from sensorwatch.scoring.components import spike_check as spike_c
from sensorwatch.scoring.components import stuck_check as stuck_c
from sensorwatch.scoring.components import threshold as threshold_c
from sensorwatch.scoring.components.common import (
    LN10,
    LOG_2,
    MEM32,
    entry,
    jit,
    raw_score,
    surprise_to_likelihood,
)
from sensorwatch.scoring.components.decision import decide, kind_of, severity_of
from sensorwatch.scoring.components.likelihood import commit, short_term_tail
from sensorwatch.scoring.features import season_slots

#: The scorer's settings as the kernels read them (``P.warmup``): flags, windows, derived constants.
PARAMS = np.dtype(
    [
        ("channels", np.int64),
        ("warmup", np.int64),
        ("score_c", np.float64),
        ("max_gap_s", np.float64),
        ("recalibrate", np.bool_),
        ("recalibrate_window", np.float64),
        ("dt_window", np.float64),
        ("dt_clip", np.float64),
        ("norm_window", np.float64),
        ("std_floor_rel", np.float64),
        ("std_floor_abs", np.float64),
        ("smoothing_alpha", np.float64),
        ("likelihood_short", np.int64),
        ("likelihood_long", np.float64),
        ("likelihood_std_floor", np.float64),
        ("likelihood_threshold", np.float64),
        ("episode_cut", np.float64),
        ("range_check", np.bool_),
        ("range_margin", np.float64),
        ("range_warmup", np.float64),
        ("range_span", np.float64),
        ("spike_check", np.bool_),
        ("spike_z", np.float64),
        ("point_likelihood", np.bool_),
        ("stuck_check", np.bool_),
        ("stuck_cut", np.float64),
        ("seasonal_check", np.bool_),
        ("seasonal_period_s", np.float64),
        ("seasonal_bin_s", np.float64),
        ("seasonal_level_alpha", np.float64),
        ("seasonal_return", np.bool_),
        ("seasonal_lag", np.int64),
        ("seasonal_slots", np.int64),
        ("seasonal_window", np.float64),
        ("alert_filter", np.bool_),
        ("filter_red", np.float64),
        ("filter_yellow", np.float64),
        ("threshold_calibrator", np.bool_),
        ("threshold_window", np.int64),
        ("threshold_every", np.int64),
        ("max_sequences", np.int64),
        ("prune_p", np.float64),
        ("min_threshold", np.float64),
        ("model_seasonal", np.bool_),
        ("model_bin_s", np.float64),
        ("model_day_lag", np.int64),
        ("model_week_lag", np.int64),
        ("model_slots", np.int64),
        ("features", np.int64),
    ]
)


def params(setup: Setup, features: int) -> np.ndarray:
    """A one-element :data:`PARAMS` array for this configuration."""
    cfg, model = setup.cfg, setup.model
    day, week = model_season.lags(setup)
    values = {
        "channels": model.channels,
        "warmup": cfg.warmup,
        "score_c": cfg.score_c,
        "max_gap_s": math.inf if cfg.max_gap_s is None else cfg.max_gap_s,
        "recalibrate": cfg.recalibrate_window is not None,
        "recalibrate_window": cfg.recalibrate_window or 1,
        "dt_window": cfg.dt_window,
        "dt_clip": cfg.dt_clip,
        "norm_window": cfg.norm_window,
        "std_floor_rel": cfg.std_floor_rel,
        "std_floor_abs": cfg.std_floor_abs,
        "smoothing_alpha": cfg.smoothing_alpha,
        "likelihood_short": cfg.likelihood_short,
        "likelihood_long": cfg.likelihood_long,
        "likelihood_std_floor": cfg.likelihood_std_floor,
        "likelihood_threshold": cfg.likelihood_threshold,
        "episode_cut": -math.log10(1.0 - cfg.likelihood_threshold),
        "range_check": cfg.range_margin is not None,
        "range_margin": cfg.range_margin or 0.0,
        "range_warmup": cfg.range_warmup,
        "range_span": cfg.range_span or 0.0,
        "spike_check": cfg.spike_z is not None,
        "spike_z": cfg.spike_z or 0.0,
        "point_likelihood": cfg.point_likelihood,
        "stuck_check": cfg.stuck_check,
        "stuck_cut": math.log1p(-cfg.likelihood_threshold),
        "seasonal_check": cfg.seasonal_check,
        "seasonal_period_s": cfg.seasonal_period_s,
        "seasonal_bin_s": cfg.seasonal_bin_s,
        "seasonal_level_alpha": cfg.seasonal_level_alpha,
        "seasonal_return": cfg.seasonal_return,
        "seasonal_lag": round(cfg.seasonal_period_s / cfg.seasonal_bin_s),
        "seasonal_slots": season_slots(cfg.seasonal_bin_s, cfg.seasonal_period_s),
        "seasonal_window": cfg.recalibrate_window or 1000,
        "alert_filter": cfg.alert_filter,
        "filter_red": cfg.filter_red,
        "filter_yellow": cfg.filter_yellow,
        "threshold_calibrator": cfg.calibrator == "threshold",
        "threshold_window": cfg.threshold_window,
        "threshold_every": cfg.threshold_every,
        "max_sequences": cfg.max_sequences,
        "prune_p": cfg.prune_p,
        "min_threshold": cfg.min_threshold,
        "model_seasonal": model.seasonal,
        "model_bin_s": model.season_bin_s,
        "model_day_lag": day,
        "model_week_lag": week,
        "model_slots": season_slots(model.season_bin_s),
        "features": features,
    }
    rec = np.zeros(1, dtype=PARAMS)
    for name, value in values.items():
        rec[0][name] = value
    return rec


def outputs(result: Any) -> tuple[np.ndarray, ...]:
    """The columns of a :class:`~sensorwatch.scoring.batch.StepResult` the kernels fill, in the order
    of their ``out`` argument."""
    r = result
    return (
        r.predicted, r.z, r.raw_score, r.smoothed_score, r.threshold, r.likelihood, r.is_anomaly,
        r.attribution, r.warming_up, r.kind, r.continues, r.ended, r.severity,
    )  # fmt: skip


def undo_log(readings: int, per_reading: int, chunks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Room for the memory writes of one wave: (store, row, column, old value) rows, and a count
    per chunk."""
    return np.empty((max(readings, 1) * per_reading, 4), dtype=np.float64), np.zeros(chunks, dtype=np.int64)


# numba's own thread pool: no second OpenMP runtime beside torch's; calls are serialised by the
# callers (the service steps its scorer under one lock).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]
#: Waves at least this large run on numba's threads (:func:`wave_parallel`); smaller ones serially.
PARALLEL_MIN = 4096


_threads: int | None = None


def set_threads(n: int) -> None:
    """Run large waves on at most ``n`` of numba's threads (the service: its ``TORCH_THREADS``)."""
    global _threads
    _threads = max(1, n)


def chunks_for(readings: int) -> int:
    """Chunks (threads) a wave of ``readings`` runs in."""
    if readings < PARALLEL_MIN:
        return 1
    threads = numba.get_num_threads()
    return threads if _threads is None else min(threads, _threads)


def writes_per_reading(setup: Setup) -> int:
    """Most memory writes one reading makes (sizes the undo log)."""
    c = setup.model.channels
    return (2 * c + 1) * (int(setup.cfg.seasonal_check) + int(setup.model.seasonal)) + 1


#: Value checks of :func:`validate`, by code (1, 2, …), in the order they take precedence.
VALUE_REJECTIONS = (
    RejectReason.NON_FINITE,
    RejectReason.VALUE_TOO_LARGE,
    RejectReason.NO_VALUES,
    RejectReason.BAD_TIMESTAMP,
)


@entry
def validate(values, ts, max_abs, code) -> bool:
    """Code (index into :data:`VALUE_REJECTIONS`, 1-based; 0 = fine) of every reading's first failed
    value check: an infinite value, a value beyond ``max_abs``, every channel missing, a non-finite
    timestamp. Returns whether any reading failed."""
    bad = False
    for i in range(values.shape[0]):
        inf = huge = False
        missing = 0
        for j in range(values.shape[1]):
            v = values[i, j]
            if math.isinf(v):
                inf = True
            elif math.isnan(v):
                missing += 1
            elif abs(v) > max_abs:
                huge = True
        if inf:
            code[i] = 1
        elif huge:
            code[i] = 2
        elif missing == values.shape[1]:
            code[i] = 3
        elif not math.isfinite(ts[i]):
            code[i] = 4
        bad = bad or code[i] != 0
    return bad


@entry
def rollback(mem32, mem64, undo, undo_n, n) -> None:
    """Undo every memory write one wave of ``n`` readings logged, newest first. ``undo_n`` (T,)
    counts the writes of each chunk, as :func:`wave_parallel` splits the log (T = 1: :func:`wave`)."""
    chunks = undo_n.size
    per = undo.shape[0] // max(n, 1)
    for t in range(chunks - 1, -1, -1):
        base = (t * n // chunks) * per
        for k in range(base + undo_n[t] - 1, base - 1, -1):
            row, col = int(undo[k, 1]), int(undo[k, 2])
            if undo[k, 0] == MEM32:
                mem32[row, col] = undo[k, 3]
            else:
                mem64[row, col] = undo[k, 3]
        undo_n[t] = 0


@entry
def wave(
    st,
    loc,
    mem32,
    mem64,
    srow,
    sel,
    xs,
    tss,
    params,
    offsets,
    zs,
    feats,
    centre,
    scale,
    gaps,
    undo,
    undo_n,
    *out,
) -> None:
    """Score the readings ``sel`` (batch positions) of one wave and build their model inputs.

    Reading ``i`` is ``xs[sel[i]]`` at ``tss[sel[i]]`` of the device whose state row is
    ``st[loc[i]]`` and memory row ``srow[i]``. Fills ``feats[i]`` (float32), ``centre[i]``,
    ``scale[i]`` (normalised → raw units), ``gaps[i]`` and, at ``sel[i]``, the output columns
    ``out`` = (predicted, z, raw score, smoothed score, threshold, likelihood, is_anomaly,
    attribution, warming up) — :func:`outputs` of a result.
    ``params``/``offsets`` are one-element :data:`PARAMS` / ``components.OFFSETS`` arrays; memory
    writes are logged in ``undo`` (``undo_n`` (1,) counts them).
    """
    _score_range(
        0,
        loc.size,
        st,
        loc,
        mem32,
        mem64,
        srow,
        sel,
        xs,
        tss,
        params,
        offsets,
        zs,
        feats,
        centre,
        scale,
        gaps,
        undo,
        undo_n[0:1],
        out,
    )


@njit(cache=True, nogil=True, error_model="numpy", parallel=True)
def wave_parallel(
    st,
    loc,
    mem32,
    mem64,
    srow,
    sel,
    xs,
    tss,
    params,
    offsets,
    zs,
    feats,
    centre,
    scale,
    gaps,
    undo,
    undo_n,
    *out,
) -> None:
    """:func:`wave` split into ``undo_n.size`` chunks run on numba's threads; chunk ``t`` (readings
    ``t·n/T … (t+1)·n/T``) logs its memory writes in its own part of ``undo`` (from row
    ``first·per_reading``) and counts them in ``undo_n[t]``. A wave touches each device once, so
    the chunks never share a row."""
    n, chunks = loc.size, undo_n.size
    per = undo.shape[0] // max(n, 1)
    for t in prange(chunks):
        a, b = t * n // chunks, (t + 1) * n // chunks
        _score_range(
            a,
            b,
            st,
            loc,
            mem32,
            mem64,
            srow,
            sel,
            xs,
            tss,
            params,
            offsets,
            zs,
            feats,
            centre,
            scale,
            gaps,
            undo[a * per : b * per],
            undo_n[t : t + 1],
            out,
        )


@entry
def _score_range(
    first,
    last,
    st,
    loc,
    mem32,
    mem64,
    srow,
    sel,
    xs,
    tss,
    params,
    offsets,
    zs,
    feats,
    centre,
    scale,
    gaps,
    undo,
    undo_n,
    out,
) -> None:
    """Readings ``first … last`` of a wave: bookkeeping, scoring, features, per reading."""
    P, ofs = params[0], offsets[0]
    c = P.channels
    f64, flags = np.empty((10, c)), np.empty((5, c), np.bool_)
    e_thr, extra = np.empty(max(P.threshold_window, 2 * adapt_c.MAX_LAGS)), np.empty(5 * c)
    x, norm_scale, observed = f64[6], f64[7], flags[4]
    oc, on = ofs.core, ofs.normaliser
    for i in range(first, last):
        row, m, b = st[loc[i]], srow[i], sel[i]
        ts = tss[b]
        for j in range(c):
            x[j] = xs[b, j]
            observed[j] = not math.isnan(x[j])
        dt, gap, has_pred, since, warming = core_c.begin(row, oc, ts, P.max_gap_s, P.warmup)
        for j in range(c):
            norm_scale[j] = normaliser_c.scale_before(row, on, j, P.std_floor_abs, P.std_floor_rel)
        likelihood = _score(
            row,
            m,
            b,
            ts,
            x,
            observed,
            row[on.dt_count],
            row[on.dt_log_mean],
            norm_scale,
            has_pred,
            warming,
            P,
            ofs,
            mem32,
            mem64,
            zs,
            f64,
            flags,
            e_thr,
            undo,
            undo_n,
            out,
        )
        _features(
            row,
            m,
            ts,
            x,
            observed,
            has_pred,
            dt,
            gap,
            P,
            ofs,
            mem32,
            mem64,
            feats[i],
            centre[i],
            scale[i],
            f64,
            flags,
            extra,
            undo,
            undo_n,
        )
        core_c.finish(row, oc, ts, since, has_pred, likelihood)
        gaps[i] = gap


@entry
def _score(
    row,
    m,
    b,
    ts,
    x,
    observed,
    dt_count,
    dt_log_mean,
    norm_scale,
    has_pred,
    warming,
    P,
    ofs,
    mem32,
    mem64,
    zs,
    f64,
    flags,
    e_thr,
    undo,
    undo_n,
    out,
):
    """Every scoring component for one reading, in order; fills its outputs at batch position ``b`` and
    returns its likelihood. ``dt_count``/``dt_log_mean``/``norm_scale``: the normaliser before this
    reading. ``f64`` rows 0–5, 8 and 9 and ``flags`` rows 0–3 are scratch, and so is ``e_thr`` (the
    threshold's, used first by the adaptation)."""
    c = x.size
    (out_predicted, out_z, out_raw, out_smoothed, out_threshold, out_likelihood, out_anomaly,
     out_attribution, out_warming, out_kind, out_continues, out_ended, out_severity) = out  # fmt: skip
    z, attr, sx_z, sx_attr, ref, resid = f64[0], f64[1], f64[2], f64[3], f64[4], f64[5]
    spike_ratio, noise = f64[8], f64[9]
    scored, sx_scored, present, remember = flags[0], flags[1], flags[2], flags[3]
    of, ol = ofs.forecast, ofs.likelihood
    armed = not warming
    # forecast residuals on the device's own scale, and their raw score
    forecast_c.residuals(
        row,
        of,
        x,
        observed,
        has_pred,
        armed,
        norm_scale,
        P.recalibrate,
        P.recalibrate_window,
        z,
        scored,
        resid,
    )
    oa = ofs.adapt
    if adapt_c.on(oa):
        adapt_c.learn(row, oa, x, observed, has_pred, of.pred_mean, adapt_c.lags_of(oa, c), e_thr)
    raw = raw_score(z, scored, P.score_c, attr)
    # seasonal check: its own residuals and raw score
    sx_raw, sx_any = 0.0, False
    if P.seasonal_check:
        seasonal_c.residuals(
            row,
            ofs.seasonal_check,
            mem32,
            mem64,
            m,
            ts,
            x,
            observed,
            P,
            sx_z,
            sx_scored,
            ref,
            present,
            remember,
            undo,
            undo_n,
        )
        sx_raw = raw_score(sx_z, sx_scored, P.score_c, sx_attr)
        for j in range(c):
            sx_any = sx_any or sx_scored[j]
    # likelihood of the forecast's raw scores (and the seasonal check's)
    n = row[ol.count]
    smoothed = raw if n == 0 else P.smoothing_alpha * raw + (1.0 - P.smoothing_alpha) * row[ol.smoothed]
    log_short, l_mean, l_var = short_term_tail(row, ol.short_ring, ol.long_mean, ol.long_var, raw, n, P)
    seasonal_won = False
    if P.seasonal_check and sx_any and has_pred:
        os_ = ofs.seasonal_check
        sx_n = row[os_.scores]
        log_sx, s_mean, s_var = short_term_tail(
            row, os_.short_ring, os_.long_mean, os_.long_var, sx_raw, sx_n, P
        )
        commit(
            row, os_.short_ring, os_.long_mean, os_.long_var, sx_raw, sx_n, s_mean, s_var, P.likelihood_short
        )
        row[os_.scores] = sx_n + 1.0
        # It speaks once it has seen a full period of its own scores (at least warm-up).
        need = max(P.seasonal_period_s / math.exp(dt_log_mean), float(P.warmup)) if dt_count > 0 else math.inf
        if sx_n >= need:
            seasonal_won = log_sx < log_short
            log_short = min(min(log_short, log_sx) + LOG_2, 0.0)
    surprise = -log_short / LN10
    if P.point_likelihood:
        surprise = max(surprise, -point_c.log_tail(raw, P.score_c) / LN10)
    # hard checks: spike, range, stuck
    spike = stuck = False
    # noise: the forecast's noise per channel, for the range check (the spike check's unit; NaN
    # without it: no condition)
    if P.spike_check:
        calm = not P.alert_filter or row[ofs.alert_filter.previous_surprise] < P.episode_cut
        spike = spike_c.hit(
            row, ofs.spike_check, resid, scored, armed, P.spike_z, P.recalibrate_window, calm,
            spike_ratio, noise,
        )  # fmt: skip
    else:
        noise[:] = math.nan
    out_of_range = False
    if P.range_check:
        out_of_range = range_c.check(
            row, ofs.range_check, x, observed, armed and n >= P.range_warmup, P.range_margin, noise,
            P.range_span,
        )  # fmt: skip
    hard = out_of_range or spike  # a spike hit is the decision's, not the likelihood's
    if P.stuck_check:
        log_stuck = stuck_c.log_tail(row, ofs.stuck_check, x, observed, P.norm_window, P.stuck_cut)
        if not armed:
            log_stuck = 0.0
        stuck = log_stuck <= P.stuck_cut
        hard = hard or stuck
        surprise = max(surprise, -log_stuck / LN10)
    if out_of_range:
        surprise = math.inf
    evidence = surprise  # before the alert filter (the severity's)
    # alert filter, likelihood
    previous_s = 0.0
    remembered = 0.0
    if P.alert_filter:
        previous_s = row[ofs.alert_filter.previous_surprise]
        surprise, remembered = alert_filter_c.apply(surprise, previous_s, P.filter_red, P.filter_yellow)
    likelihood = surprise_to_likelihood(surprise)
    if has_pred:
        row[ol.count] = n + 1.0
        row[ol.smoothed] = smoothed
        commit(row, ol.short_ring, ol.long_mean, ol.long_var, raw, n, l_mean, l_var, P.likelihood_short)
        if P.alert_filter:
            row[ofs.alert_filter.previous_surprise] = remembered
    else:
        likelihood, smoothed = 0.0, 0.0
    # decision, dynamic threshold
    epsilon = row[ofs.threshold.epsilon] if P.threshold_calibrator else math.inf
    out_anomaly[b] = decide(P, likelihood, smoothed, epsilon, hard, previous_s, has_pred, armed)
    out_kind[b] = kind_of(out_anomaly[b], out_of_range, spike, stuck, seasonal_won)
    out_continues[b], out_ended[b] = episode_c.track(row, ofs.episode, out_kind[b])
    out_severity[b] = 0
    if out_kind[b]:  # an anomaly: its severity (the largest |z| only then, off the hot path)
        deviation = 0.0
        for j in range(c):
            if scored[j]:
                deviation = max(deviation, abs(z[j]))
        out_severity[b] = severity_of(out_kind[b], evidence, deviation, P.filter_red)
    if P.threshold_calibrator and has_pred:
        threshold_c.update(row, ofs.threshold, mem32, m, smoothed, n + 1.0, P, zs, e_thr, undo, undo_n)
    out_threshold[b] = epsilon if P.threshold_calibrator else P.likelihood_threshold
    out_likelihood[b] = likelihood
    out_smoothed[b] = smoothed
    out_raw[b] = raw if has_pred else 0.0
    out_warming[b] = warming
    for j in range(c):
        out_predicted[b, j] = row[of.pred_mean + j] if has_pred else math.nan
        out_z[b, j] = z[j] if scored[j] else math.nan
        out_attribution[b, j] = sx_attr[j] if seasonal_won else attr[j]
    if spike and not out_of_range:  # a spike is the channels' own residuals against their units
        total = 0.0
        for j in range(c):
            total += spike_ratio[j] * spike_ratio[j]
        for j in range(c):
            out_attribution[b, j] = spike_ratio[j] * spike_ratio[j] / total if total > 0.0 else attr[j]
    return likelihood


@entry
def _features(
    row,
    m,
    ts,
    x,
    observed,
    has_pred,
    dt,
    gap,
    P,
    ofs,
    mem32,
    mem64,
    feats,
    centre,
    scale,
    f64,
    flags,
    extra,
    undo,
    undo_n,
) -> None:
    """The forecaster's inputs for one reading into ``feats`` (and ``centre``/``scale``: normalised →
    raw units); missing channels imputed with the prediction (the running mean before one exists).
    ``f64`` rows 0–4 and ``flags`` row 2 are scratch."""
    c = x.size
    of, on = ofs.forecast, ofs.normaliser
    x_filled, x_norm, ref, present = f64[0], f64[1], f64[4], flags[2]
    for j in range(c):
        if observed[j]:
            x_filled[j] = x[j]
        else:
            x_filled[j] = row[of.pred_mean + j] if has_pred else row[on.mean + j]
    normaliser_c.normalise(
        row, on, x_filled, observed, P.norm_window, P.std_floor_abs, P.std_floor_rel, x_norm, centre, scale
    )
    dt_feat = normaliser_c.delta_t(row, on, dt, not gap, P.dt_window, P.dt_clip)
    for j in range(c):
        feats[j] = x_norm[j]
        feats[c + j] = 1.0 if observed[j] else 0.0
    feats[2 * c] = dt_feat
    if P.model_seasonal:
        typical = math.exp(row[on.dt_log_mean]) if row[on.dt_count] > 0 else 0.0
        model_season.inputs(
            row,
            ofs.model_season,
            mem32,
            mem64,
            m,
            ts,
            ts + typical,
            x,
            x_filled,
            observed,
            scale,
            gap,
            P,
            extra,
            ref,
            present,
            undo,
            undo_n,
        )
        for k in range(5 * c):
            feats[2 * c + 1 + k] = extra[k]


# ------------------------------------------------------------------------------------------ sequences
# A batch whose devices each bring several readings, all channels observed and no gap after their
# first, runs as sequences: the forecaster's inputs for every reading first (the features need no
# forecast when nothing is imputed), one forecaster call over each device's sequence, then the
# scoring components over each sequence in order, with the forecast of step t − 1 stored before
# step t is scored. Components own disjoint state, so only the interleaving changes, not a result.
@entry
def sequence_features(
    st,
    dev_loc,
    dev_srow,
    starts,
    lengths,
    order,
    mem32,
    mem64,
    xs,
    tss,
    params,
    offsets,
    feats,
    centre,
    scale,
    rec,
    rec_flags,
    undo,
    undo_n,
) -> None:
    """Phase 1 for devices ``d`` (``order[starts[d]:starts[d] + lengths[d]]`` are its readings'
    batch positions, in time order): bookkeeping and features into ``feats[d, t]``, and what the
    scoring phase needs recorded per reading ``k`` (sorted position): ``rec[k]`` = normaliser scale
    before the reading (C), Δt count and log-mean before it; ``rec_flags[k]`` = (gap, has a
    prediction, warming up)."""
    P, ofs = params[0], offsets[0]
    c = P.channels
    f64, flags = np.empty((10, c)), np.empty((5, c), np.bool_)
    extra = np.empty(5 * c)
    x, observed = f64[6], flags[4]
    oc, on = ofs.core, ofs.normaliser
    for d in range(dev_loc.size):
        row, m = st[dev_loc[d]], dev_srow[d]
        for t in range(lengths[d]):
            k = starts[d] + t
            b = order[k]
            ts = tss[b]
            for j in range(c):
                x[j] = xs[b, j]
                observed[j] = True
            dt, gap, has_pred, since, warming = core_c.begin(row, oc, ts, P.max_gap_s, P.warmup)
            for j in range(c):
                rec[k, j] = normaliser_c.scale_before(row, on, j, P.std_floor_abs, P.std_floor_rel)
            rec[k, c], rec[k, c + 1] = row[on.dt_count], row[on.dt_log_mean]
            rec_flags[k, 0], rec_flags[k, 1], rec_flags[k, 2] = gap, has_pred, warming
            _features(
                row,
                m,
                ts,
                x,
                observed,
                has_pred,
                dt,
                gap,
                P,
                ofs,
                mem32,
                mem64,
                feats[d, t],
                centre[k],
                scale[k],
                f64,
                flags,
                extra,
                undo,
                undo_n,
            )
            core_c.finish(row, oc, ts, since, False, 0.0)  # (the likelihood comes in phase 2)


@entry
def sequence_score(
    st,
    dev_loc,
    dev_srow,
    starts,
    lengths,
    order,
    mem32,
    mem64,
    xs,
    tss,
    params,
    offsets,
    zs,
    mean_n,
    scale_n,
    centre,
    scale,
    rec,
    rec_flags,
    undo,
    undo_n,
    *out,
) -> None:
    """Phase 2: the scoring components over each device's sequence; ``mean_n[d, t]``/``scale_n[d, t]``
    is the forecast made at step t (of step t + 1), stored before step t + 1 is scored and, for the
    last step, kept for the next batch."""
    P, ofs = params[0], offsets[0]
    c = P.channels
    f64, flags = np.empty((10, c)), np.empty((5, c), np.bool_)
    e_thr = np.empty(max(P.threshold_window, 2 * adapt_c.MAX_LAGS))
    x, norm_scale, observed = f64[6], f64[7], flags[4]
    oc = ofs.core
    for d in range(dev_loc.size):
        row, m = st[dev_loc[d]], dev_srow[d]
        for t in range(lengths[d]):
            k = starts[d] + t
            b = order[k]
            if t > 0:
                _store(row, ofs, mean_n[d, t - 1], scale_n[d, t - 1], centre[k - 1], scale[k - 1])
            for j in range(c):
                x[j] = xs[b, j]
                observed[j] = True
                norm_scale[j] = rec[k, j]
            has_pred = rec_flags[k, 1]
            likelihood = _score(
                row,
                m,
                b,
                tss[b],
                x,
                observed,
                rec[k, c],
                rec[k, c + 1],
                norm_scale,
                has_pred,
                rec_flags[k, 2],
                P,
                ofs,
                mem32,
                mem64,
                zs,
                f64,
                flags,
                e_thr,
                undo,
                undo_n,
                out,
            )
            if has_pred:
                row[oc.last_likelihood] = likelihood
        last = lengths[d] - 1
        k = starts[d] + last
        _store(row, ofs, mean_n[d, last], scale_n[d, last], centre[k], scale[k])


@entry
def store_predictions(st, loc, offsets, mean_n, scale_n, centre, scale) -> None:
    """Keep the wave's forecasts (float32, normalised units) in raw units for the next reading."""
    ofs = offsets[0]
    for i in range(loc.size):
        _store(st[loc[i]], ofs, mean_n[i], scale_n[i], centre[i], scale[i])


@jit
def _store(row, ofs, mean_n, scale_n, centre, scale) -> None:
    """The forecast for the device's next reading, in raw units, corrected where adaptation is on."""
    forecast_c.store_prediction(row, ofs.forecast, mean_n, scale_n, centre, scale)
    oa = ofs.adapt
    if adapt_c.on(oa):
        c = centre.size
        adapt_c.correct(row, oa, ofs.forecast.pred_mean, c, adapt_c.lags_of(oa, c))


def warm(pairs: list[tuple[Any, Any]] | None = None) -> None:
    """Compile, or load from numba's on-disk cache, every kernel a scorer uses — one-reading waves, a
    parallel-sized wave, sequences, several waves — on scratch scorers of each (model, ScorerConfig)
    of ``pairs`` (default: a small default-config model and a seasonal threshold-calibrated one).
    Loading takes ~0.5 s per process: the service does it before it reports ready."""
    from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
    from sensorwatch.scoring.batch import ReadingBatch
    from sensorwatch.scoring.config import ScorerConfig
    from sensorwatch.scoring.scorer import StreamScorer

    if pairs is None:
        pairs = [
            (Forecaster(ForecasterConfig(hidden_size=4)), ScorerConfig()),
            (
                Forecaster(ForecasterConfig(hidden_size=4, seasonal=True)),
                ScorerConfig(calibrator="threshold"),
            ),
        ]
    for model, cfg in pairs:
        scorer = StreamScorer(model, cfg.model_copy(update={"max_devices": PARALLEL_MIN}), device="cpu")
        c = model.config.channels
        # A parallel-sized wave only where large waves run in parallel (not in the service by default).
        for n in (3, PARALLEL_MIN) if chunks_for(PARALLEL_MIN) > 1 else (3,):
            ids = [f"warm-{i}" for i in range(n)]
            for k in range(2):
                scorer.step(ReadingBatch(ids, np.full(n, 1e9 + 60.0 * k), np.ones((n, c))))
        two = np.ones((2, c))
        scorer.step(ReadingBatch(["warm-0", "warm-0"], [2e9, 2e9 + 1], two))  # sequences
        scorer.step(ReadingBatch(["warm-0", "warm-0"], [3e9, 3e9 + 1e6], two))  # two waves (a gap)


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    warm()
    print(f"scoring kernels ready in {time.perf_counter() - t0:.1f} s (cache {numba.config.CACHE_DIR})")
