"""From standardised residuals to a calibrated, explainable decision — per device, streaming, vectorised.

Pipeline for a batch of B readings of B distinct devices (every function works on gathered rows):

1. **Raw score** (:func:`raw_score`): the channel residuals ``z`` (B, C) are combined into one
   equivalent |z| through the χ² tail probability of Σz² with k = observed channels (for k = 1 this
   is exactly |z|), then squashed as ``1 − exp(−(z/c)²/2)`` — a smooth map to [0, 1) that does not
   create ties near 1 the way tanh does. Attribution = each channel's share of Σz².
2. **Smoothing**: EWMA of the raw score.
3. **Anomaly likelihood** (Numenta-style): the short-term mean of raw scores (last
   ``likelihood_short``) is compared with the long-term distribution of those means (EW mean and
   variance over ``likelihood_long`` readings, estimated *before* the current reading):
   tail = 1 − Φ((short − μ)/σ); with ``point_likelihood`` also the two-sided Gaussian tail of the
   reading's own residual, with ``stuck_check`` the stuck-run tail p^r. All tails stay in log space
   (``log_ndtr``) and are combined as the smallest tail → **surprise** S = −log10(tail) (decimal
   digits, unbounded). Optionally (``empirical_surprise``) each kind of surprise is first
   recalibrated against the device's own history (conformal, Bonferroni over the kinds). Numenta's
   alert filter (``alert_filter``) then lowers a red reading that follows a red reading (one alert
   per episode); with it, the likelihood calibrator's ``is_anomaly`` also marks only the first
   reading of an episode at the decision cut (range and stuck flags last as long as the condition).
   likelihood = :func:`surprise_to_likelihood` (S): exactly 1 − 10^(−S) up to S = 8, compressed
   above so that it never rounds to 1.0 in float64 — the column is order-preserving without ties.
   **Seasonal check** (``seasonal_check``, :func:`seasonal_residual`): a model-independent second
   expert compares each reading with the same time bin one period earlier (level offset removed)
   and gets its own likelihood of the same kind; the more surprising of the two tails counts, times
   2 (Bonferroni) where both speak. It sees contextual anomalies — a normal value at the wrong time
   of day — that a one-step forecast cannot.
4. **Range check**: a value outside the device's range so far by more than ``range_margin`` of the
   range gets likelihood exactly 1 (the one top value) — one isolated spike barely moves a
   short-term mean, this catches it.
5. **Dynamic threshold** (Telemanom-style, calibrator ``threshold``): the smoothed scores of the
   last ``threshold_window`` readings live in a per-device ring; every ``threshold_every`` readings
   the threshold ε = μ + zσ is re-fit by choosing the z that best separates the flagged points
   (largest relative drop of mean and std below ε, penalised by the number of flagged points and
   sequences), then minor peaks are pruned by requiring ε ≥ max nominal score / (1 − p).
   O(W·Z) every K readings = O(1) amortised per reading.

Calibrators differ only in what decides ``is_anomaly``; both report every column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sensorwatch.scoring import features as feat
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.state.store import ColumnSpec

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
LN10 = math.log(10.0)
LOG_2 = math.log(2.0)
LOG_HALF = -LOG_2
#: Largest raw score inverted for the point likelihood (raw rounds to 1.0 beyond z ≈ 8.6·c).
RAW_MAX = 1.0 - 2.0**-53
#: Surprise (decimal digits) below which the likelihood is exactly 1 − 10^(−surprise).
SURPRISE_EXACT = 8.0
#: Bound of the compressed surprise: likelihood < 1 − 10^(−SURPRISE_TOP) for every finite surprise,
#: still resolved in float64 (a tail of 1e-12 carries ~4 significant digits next to 1.0).
SURPRISE_TOP = 12.0
#: Histogram of past surprises (empirical recalibration): bin width in decimal digits and bin count
#: (the last bin holds everything above 15.75 digits).
SURPRISE_BIN = 0.25
SURPRISE_BINS = 64
#: Largest step (decimal digits) by which one reading may raise the maximum of the stuck-tail history.
STUCK_MAX_STEP = 3.0
#: Surprise a range-check hit stands for when it is damped or remembered (finite, above realistic tails).
SURPRISE_CAP = 100.0


def surprise_to_likelihood(surprise: torch.Tensor) -> torch.Tensor:
    """Map surprise S = −log10(tail probability) ∈ [0, ∞] monotonically into [0, 1] without ties.

    Up to ``SURPRISE_EXACT`` (8) digits the likelihood is exactly 1 − 10^(−S) (so 0.9999 ⇔ S = 4);
    above, S is compressed smoothly (continuous slope) towards ``SURPRISE_TOP`` (12) digits, so
    distinct finite surprises keep distinct likelihoods below 1.0 in float64. S = ∞ (a range-check
    hit) is exactly 1.0.
    """
    s = surprise.clamp_min(0.0)
    span = SURPRISE_TOP - SURPRISE_EXACT
    over = (s - SURPRISE_EXACT).clamp_min(0.0)
    g = torch.where(s <= SURPRISE_EXACT, s, SURPRISE_EXACT + span * over / (over + span))
    g = torch.where(torch.isinf(s), math.inf, g)
    return -torch.expm1(-g * LN10)


def calibration_columns(channels: int, cfg: ScorerConfig) -> dict[str, ColumnSpec]:
    cols = {
        "cal_n": ColumnSpec((), F64),
        "smooth": ColumnSpec((), F64),
        "st_ring": ColumnSpec((cfg.likelihood_short,), F64),
        "lt_mean": ColumnSpec((), F64),
        "lt_var": ColumnSpec((), F64),
        "rng_lo": ColumnSpec((channels,), F64, math.inf),
        "rng_hi": ColumnSpec((channels,), F64, -math.inf),
    }
    if cfg.recalibrate_window is not None:
        cols["zvar"] = ColumnSpec((channels,), F64)
        cols["zvar_n"] = ColumnSpec((channels,), F64)
    if cfg.stuck_check:
        cols["prev_x"] = ColumnSpec((channels,), F64, math.nan)
        cols["rep_n"] = ColumnSpec((channels,), F64)
        cols["rep_ew"] = ColumnSpec((channels,), F64)
        cols["run"] = ColumnSpec((channels,), F64)
    if cfg.empirical_surprise:
        k = 1 + int(cfg.point_likelihood) + int(cfg.stuck_check)
        # History of each kind of surprise, from readings past warm-up only (``s_n`` of them).
        cols["s_hist"] = ColumnSpec((k, SURPRISE_BINS), F64)
        cols["s_max"] = ColumnSpec((k,), F64)
        cols["s_n"] = ColumnSpec((), F64)
    if cfg.alert_filter:
        cols["prev_s"] = ColumnSpec((), F64)
    if cfg.seasonal_check:
        cols.update(seasonal_check_columns(channels, cfg))
    if cfg.calibrator == "threshold":
        cols["eps"] = ColumnSpec((), F64, math.inf)
        # The ring of smoothed scores is updated in place (never gathered whole on the hot path).
        cols["win"] = ColumnSpec((cfg.threshold_window,), torch.float32)
    return cols


#: Residuals beyond this many (recalibrated) standard deviations update the running RMS as if they
#: were this large: one huge outlier must not blind the device to the next one.
RECAL_CLIP = 5.0
#: Readings of a channel before its recalibration factor is used.
RECAL_MIN = 10


def recalibrate(
    rows: Mapping[str, torch.Tensor],
    z: torch.Tensor,
    e_rel: torch.Tensor,
    scored: torch.Tensor,
    learn: torch.Tensor,
    cfg: ScorerConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Residuals (B, C) on the device's own scale (causal).

    ``z`` is the residual over the model's predicted scale in raw units (model scale × the
    normaliser's std), ``e_rel`` the residual over the model's scale alone (raw units, relative to
    the model's uncertainty). Once a channel has ``RECAL_MIN`` learnt residuals the result is
    ``e_rel / RMS(past e_rel)``: the device's own residual history sets the unit, the model's scale
    only says how much more or less certain this step is than usual. The normaliser's std is *not*
    part of the unit: it tracks the spread of the values, which drifts (a level shift multiplies it
    for thousands of readings) and would make every later residual look small (NAB −9.5 with the
    built-in model, measured offline). Before that, ``z`` is used. Channels in ``learn`` (B, C)
    update the RMS (one huge outlier counts as ``RECAL_CLIP`` RMS so it does not blind the device to
    the next one). With ``recalibrate_window=None`` the model's scale is trusted: ``z`` as is.
    """
    if cfg.recalibrate_window is None:
        return z, {}
    n, var = rows["zvar_n"], rows["zvar"]
    ready = n >= RECAL_MIN
    rms = torch.sqrt(var).clamp_min(1e-300)
    z_cal = torch.where(scored, torch.where(ready, e_rel / rms, z), 0.0)
    n_new, var_new = rms_update(n, var, e_rel, learn, ready, cfg.recalibrate_window)
    return z_cal, {"zvar_n": n_new, "zvar": var_new}


def rms_update(
    n: torch.Tensor, var: torch.Tensor, e: torch.Tensor, learn: torch.Tensor, ready: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of a running mean square of residuals ``e`` over ``window`` readings (exact mean for
    the first ones): entries in ``learn`` count once more; once ``ready``, a residual beyond
    ``RECAL_CLIP`` RMS counts as that large. Returns the new count and mean square."""
    e2 = torch.where(learn, torch.minimum(e * e, RECAL_CLIP**2 * torch.where(ready, var, e * e)), 0.0)
    n_new = n + learn.to(F64)
    alpha = torch.where(learn, 1.0 / n_new.clamp(min=1, max=window), 0.0)
    return n_new, var + alpha * (e2 - var)


#: Seasonal-check residuals beyond this many RMS are not remembered, and move the level offset by at
#: most this many RMS (see :func:`seasonal_residual`).
SEASONAL_CLIP = 3.0
#: Prefix of the seasonal check's ring of bin means (see :func:`seasonal_residual`).
SEASONAL_RING = "sx"
#: Columns the scorer must not gather/scatter per step (updated in place by the calibrator).
IN_PLACE_COLUMNS = frozenset({"win"}) | frozenset(feat.seasonal_columns(1, prefix=SEASONAL_RING))
#: (short-term ring, long-term mean, long-term variance) columns of each likelihood.
FORECAST_LIKELIHOOD = ("st_ring", "lt_mean", "lt_var")
SEASONAL_LIKELIHOOD = ("sx_st_ring", "sx_lt_mean", "sx_lt_var")


def seasonal_check_columns(channels: int, cfg: ScorerConfig) -> dict[str, ColumnSpec]:
    """State of the seasonal check: the ring of bin means (in place), the level difference it
    removes, the running RMS of its residuals and its own likelihood statistics."""
    ring = feat.seasonal_columns(channels, cfg.seasonal_bin_s, cfg.seasonal_period_s, prefix=SEASONAL_RING)
    ring_, mean_, var_ = SEASONAL_LIKELIHOOD
    return {
        **ring,
        "sx_lvl": ColumnSpec((channels,), F64),
        "sx_zvar": ColumnSpec((channels,), F64),
        "sx_zn": ColumnSpec((channels,), F64),
        "sx_n": ColumnSpec((), F64),
        ring_: ColumnSpec((cfg.likelihood_short,), F64),
        mean_: ColumnSpec((), F64),
        var_: ColumnSpec((), F64),
    }


def seasonal_residual(
    memory: Mapping[str, torch.Tensor],
    idx: torch.Tensor,
    rows: Mapping[str, torch.Tensor],
    ts: torch.Tensor,
    x: torch.Tensor,
    observed: torch.Tensor,
    cfg: ScorerConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The seasonal check's standardised residuals (B, C) and which channels have one (B, C).

    An additive season-plus-level model per device and channel: the ring in ``memory`` (rows ``idx``)
    holds, per time bin, the mean *level-free* reading ``x − L`` one ``seasonal_period_s`` earlier
    (``m``), and ``L`` is the level offset since then. For an observed channel with a remembered bin:
    ``d = x − m``, residual ``e = d − L``, ``z = e / RMS`` of past residuals (floored like the
    normaliser's std); then ``L`` moves towards ``d`` by ``seasonal_level_alpha`` of ``e`` (clipped at
    ``SEASONAL_CLIP`` RMS), so a level shift stops being surprising once it has persisted while a
    reading that breaks the daily shape does not.

    Only *ordinary* readings (``|z| ≤ SEASONAL_CLIP``, or no residual yet) are remembered, as
    ``x − L``: an anomalous stretch leaves its bins empty, so the check abstains there one period
    later instead of raising an echo of the anomaly, and a level shift is remembered relative to the
    level that absorbed it (no echo either). A lasting change of the daily shape is re-learnt: its
    bins alert for one period, are empty the next (the check abstains) and are remembered after.

    A channel has a residual once ``max(RECAL_MIN, warmup)`` residuals set its RMS (each clipped at
    ``RECAL_CLIP`` RMS like :func:`recalibrate`); the check's own likelihood counts once it has seen a
    full period of its own scores (:func:`calibrate`), so a new device's seasonal check speaks from
    its third period on: one to remember, one to learn how surprising its residuals usually are.
    Memory with the defaults (hourly bins, a day): 25 slots, about 0.4 KB per univariate device.
    """
    lag = round(cfg.seasonal_period_s / cfg.seasonal_bin_s)
    ref, present = feat.seasonal_lookup(memory, idx, ts, lag, cfg.seasonal_bin_s, SEASONAL_RING)
    present = present & observed
    lvl = rows["sx_lvl"]
    e = torch.where(present, x - ref - lvl, 0.0)

    n, var = rows["sx_zn"], rows["sx_zvar"]
    ready = n >= max(RECAL_MIN, cfg.warmup)
    rms = feat.floored_std(torch.sqrt(var), ref, cfg)
    scored = present & ready
    z = torch.where(scored, e / rms, 0.0)
    step = torch.where(ready, torch.maximum(torch.minimum(e, SEASONAL_CLIP * rms), -SEASONAL_CLIP * rms), e)
    new_lvl = torch.where(present, lvl + cfg.seasonal_level_alpha * step, lvl)
    ordinary = observed & ~(scored & (z.abs() > SEASONAL_CLIP))
    feat.seasonal_update(memory, idx, ts, x - new_lvl, ordinary, cfg.seasonal_bin_s, prefix=SEASONAL_RING)

    n_new, var_new = rms_update(n, var, e, present, ready, cfg.recalibrate_window or 1000)
    return z, scored, {"sx_lvl": new_lvl, "sx_zn": n_new, "sx_zvar": var_new}


def short_term_tail(
    rows: Mapping[str, torch.Tensor],
    names: tuple[str, str, str],
    raw: torch.Tensor,
    n: torch.Tensor,
    cfg: ScorerConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Numenta's anomaly likelihood of raw scores (B,): log of the Gaussian tail of the short-term mean
    (last ``likelihood_short`` raw scores) under the long-term distribution of those means (EW mean and
    variance over ``likelihood_long``, estimated before this reading). ``n`` counts earlier scores;
    ``names`` are the (ring, mean, variance) columns. Returns the log tail and the new columns."""
    ring_k, mean_k, var_k = names
    s = cfg.likelihood_short
    pos = (n % s).long()
    ring = rows[ring_k].clone()
    ring.scatter_(1, pos[:, None], raw[:, None])
    short = ring.sum(1) / torch.clamp(n + 1, max=s)
    sd = torch.sqrt(rows[var_k]).clamp_min(cfg.likelihood_std_floor)
    log_tail = torch.where(n >= 2, torch.special.log_ndtr(-(short - rows[mean_k]) / sd), LOG_HALF)
    alpha = 1.0 / torch.clamp(n + 1, max=cfg.likelihood_long)
    delta = short - rows[mean_k]
    mean = rows[mean_k] + alpha * delta
    var = (1 - alpha) * (rows[var_k] + alpha * delta * delta)
    return log_tail, {ring_k: ring, mean_k: mean, var_k: var}


def stuck_log_tail(
    rows: Mapping[str, torch.Tensor], x: torch.Tensor, observed: torch.Tensor, cfg: ScorerConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stuck-sensor tail: r = current run of identical values on a channel, p = its Laplace-smoothed
    repeat rate before this reading. Returns (log p^r, minimised over channels (B,), state updates);
    the stuck likelihood is 1 − exp(returned value)."""
    prev = rows["prev_x"]
    cmp = observed & torch.isfinite(prev)
    rep = cmp & (x == prev)
    m = rows["rep_n"].clamp(max=cfg.norm_window)
    p = (rows["rep_ew"] * m + 1) / (m + 2)
    run = torch.where(rep, rows["run"] + 1, torch.where(cmp, 0.0, rows["run"]))
    log_tail = torch.where(run > 0, run * torch.log(p), 0.0).amin(1)
    n_new = rows["rep_n"] + cmp.to(F64)
    alpha = torch.where(cmp, 1.0 / n_new.clamp(min=1, max=cfg.norm_window), 0.0)
    upd = {
        "prev_x": torch.where(observed, x, prev),
        "rep_n": n_new,
        "rep_ew": rows["rep_ew"] + alpha * (rep.to(F64) - rows["rep_ew"]),
        "run": run,
    }
    return log_tail, upd


def empirical_surprise(
    rows: Mapping[str, torch.Tensor],
    surprise: torch.Tensor,
    learn: torch.Tensor,
    cfg: ScorerConfig,
    max_step: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Recalibrate model surprises (B, K), each kind separately, against the device's own history.

    (Conformal in spirit.)

    A Gaussian tail over-states rare events on heavy-tailed or near-deterministic series (thousands
    of "1e-12" readings on one device). Here the surprise becomes −log10 of the (smoothed) fraction
    of the device's past readings, over a ``likelihood_long`` horizon, that were at least as
    surprising — r = (exceed·m + 1)/(m + 1) with m past readings — plus, beyond the most surprising
    reading ever seen, the excess in decimal digits. A per-device histogram of ``SURPRISE_BINS``
    bins of ``SURPRISE_BIN`` digits holds the history (linear binning and interpolation, so
    scores are continuous in the surprise).

    Only readings in ``learn`` (B,) — scored and past warm-up — enter the history (``s_n`` counts
    them): residuals of a model whose normaliser has not settled yet would set the "most surprising
    reading seen" so high that no later anomaly could exceed it.
    """
    w = SURPRISE_BIN
    s = surprise.clamp_min(0.0)
    pos = s / w
    b = pos.floor().clamp(max=SURPRISE_BINS - 1)
    frac = (pos - b).clamp(0.0, 1.0)
    b = b.long()[..., None]
    h = rows["s_hist"][:, : s.shape[1]]
    tail_incl = torch.flip(torch.cumsum(torch.flip(h, [2]), 2), [2])
    exceed = (tail_incl.gather(2, b)[..., 0] - h.gather(2, b)[..., 0] * frac).clamp_min(0.0)
    s_n = rows["s_n"]
    m = torch.clamp(s_n, max=cfg.likelihood_long)[:, None]
    r = (exceed * m + 1) / (m + 1)
    s_max = rows["s_max"][:, : s.shape[1]]
    s_cal = -torch.log10(r) + (s - s_max).clamp_min(0.0)
    lrn = learn.to(F64)
    alpha = (lrn / torch.clamp(s_n + 1, max=cfg.likelihood_long))[:, None, None]
    if max_step is not None:
        # The history learns at most ``max_step`` digits beyond its maximum per reading.
        s = torch.minimum(s, s_max + max_step)
        pos = s / w
        b = pos.floor().clamp(max=SURPRISE_BINS - 1)
        frac = (pos - b).clamp(0.0, 1.0)
        b = b.long()[..., None]
    # Linear (soft) binning: the mass is split between the bin and the next one, so the history, and
    # every later score, moves continuously with the surprise (no jump at a bin edge).
    b1 = (b[..., 0] + 1).clamp(max=SURPRISE_BINS - 1)
    onehot = torch.nn.functional.one_hot(b[..., 0], SURPRISE_BINS).to(h.dtype) * (1 - frac)[..., None]
    onehot = onehot + torch.nn.functional.one_hot(b1, SURPRISE_BINS).to(h.dtype) * frac[..., None]
    upd = {
        "s_hist": h + alpha * (onehot - h),
        "s_max": torch.where(learn[:, None], torch.maximum(s_max, s), s_max),
        "s_n": s_n + lrn,
    }
    return s_cal, upd


def alert_filter(
    surprise: torch.Tensor, prev: torch.Tensor, cfg: ScorerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numenta's red/yellow filter on surprises (B,): returns (filtered surprise, new ``prev``).

    A reading at least ``filter_red`` digits surprising whose predecessor (unfiltered) also was is
    lowered to ``filter_yellow · S / (S + 1)`` digits (< ``filter_yellow``, order-preserving, so
    the filter creates no ties). Range-check hits (S = ∞) are never lowered. NAB counts every alert
    row outside a window as a false positive, and a sustained deviation keeps the short-term mean
    high for ``likelihood_short`` readings: this keeps the first alert of such a run only.

    >>> import torch
    >>> from sensorwatch.scoring.config import ScorerConfig
    >>> s = torch.tensor([6.0, 7.0, 2.0, float("inf")], dtype=torch.float64)
    >>> out, prev = alert_filter(s, torch.tensor([0.0, 5.5, 9.0, 9.0], dtype=torch.float64), ScorerConfig())
    >>> [round(v, 3) for v in out.tolist()], prev.tolist()
    ([6.0, 2.625, 2.0, inf], [6.0, 7.0, 2.0, 100.0])
    """
    red = (surprise >= cfg.filter_red) & (prev >= cfg.filter_red) & torch.isfinite(surprise)
    lowered = cfg.filter_yellow * surprise / (surprise + 1.0)
    return torch.where(red, lowered, surprise), surprise.clamp(max=SURPRISE_CAP)


def raw_score(z: torch.Tensor, scored: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw score (B,) in [0, 1) and attribution (B, C) summing to 1 from residuals ``z`` (B, C).

    ``scored`` (B, C) marks the channels that have a residual (observed and predicted).
    """
    z2 = torch.where(scored, z * z, torch.zeros_like(z))
    ss = z2.sum(1)
    k = scored.sum(1).to(F64)
    q = torch.special.gammaincc(k.clamp_min(1) / 2, ss / 2)  # χ²_k tail probability of Σz²
    z_eq = torch.where(k > 0, -torch.special.ndtri((q / 2).clamp_min(1e-300)), torch.zeros_like(ss))
    raw = -torch.expm1(-0.5 * (z_eq / c) ** 2)
    weights = torch.where(ss[:, None] > 0, z2, scored.to(F64))
    none = weights.sum(1, keepdim=True) == 0
    weights = torch.where(none, torch.ones_like(weights), weights)
    return raw, weights / weights.sum(1, keepdim=True)


@dataclass
class CalibrationOut:
    smoothed: torch.Tensor
    threshold: torch.Tensor
    likelihood: torch.Tensor
    decision: torch.Tensor
    rows: dict[str, torch.Tensor]
    #: (B,) readings whose seasonal-check tail was the more surprising (attribution follows it).
    seasonal_won: torch.Tensor


def calibrate(
    rows: Mapping[str, torch.Tensor],
    raw: torch.Tensor,
    x: torch.Tensor,
    observed: torch.Tensor,
    scored: torch.Tensor,
    armed: torch.Tensor,
    cfg: ScorerConfig,
    seasonal_raw: torch.Tensor | None = None,
    seasonal_scored: torch.Tensor | None = None,
) -> CalibrationOut:
    """Smoothed score, threshold, likelihood and decision for B readings of B distinct devices.

    ``scored`` (B,) marks readings with a valid raw score (not a device's first reading or a gap
    reset); only those update the score statistics. ``armed`` (B,) marks readings past warm-up
    (the range check needs a learnt range). State rows of unscored readings are left unchanged
    except for the observed range. With ``cfg.seasonal_check``, ``seasonal_raw`` (B,) is the raw
    score of the seasonal check's residuals and ``seasonal_scored`` (B,) marks readings that have
    one (:func:`seasonal_residual`).
    """
    n = rows["cal_n"]
    first = n == 0
    smoothed = torch.where(first, raw, cfg.smoothing_alpha * raw + (1 - cfg.smoothing_alpha) * rows["smooth"])

    # Anomaly likelihood: short-term mean vs the long-term distribution seen so far. Every tail is
    # kept in log space (natural log of a probability ≤ 1) so that nothing saturates at 1.0.
    log_short, lik_rows = short_term_tail(rows, FORECAST_LIKELIHOOD, raw, n, cfg)
    seasonal_won = torch.zeros_like(scored)
    sx_rows: dict[str, torch.Tensor] = {}
    if cfg.seasonal_check and seasonal_raw is not None and seasonal_scored is not None:
        # The seasonal check's own likelihood; the more surprising of the two tails counts, with a
        # Bonferroni factor of 2 where both exist (the tails are kept in natural-log units here).
        sx = seasonal_scored & scored
        log_sx, sx_rows = short_term_tail(rows, SEASONAL_LIKELIHOOD, seasonal_raw, rows["sx_n"], cfg)
        # Its own warm-up: its likelihood counts once its statistics have seen a full period of its
        # own scores (their distribution changes over the day), at least ``warmup`` of them.
        sx_rows = {k: torch.where(_bcast(sx, v), v, rows[k]) for k, v in sx_rows.items()}
        sx_rows["sx_n"] = rows["sx_n"] + sx.to(F64)
        per_period = cfg.seasonal_period_s / torch.exp(rows["dt_logmean"])
        settled = rows["sx_n"] >= torch.where(rows["dt_n"] > 0, per_period.clamp(min=cfg.warmup), math.inf)
        sx = sx & settled
        seasonal_won = sx & (log_sx < log_short)
        log_short = torch.where(sx, (torch.minimum(log_short, log_sx) + LOG_2).clamp(max=0.0), log_short)
    log_tails = [log_short]
    if cfg.point_likelihood:
        # Invert raw = 1 − exp(−(z/c)²/2) for the equivalent |z|; its two-sided Gaussian tail.
        z_eq = cfg.score_c * torch.sqrt(-2.0 * torch.log1p(-raw.clamp(max=RAW_MAX)))
        log_tails.append(LOG_2 + torch.special.log_ndtr(-z_eq))

    # Range check on the raw values.
    lo, hi = rows["rng_lo"], rows["rng_hi"]
    margin = (cfg.range_margin or 0.0) * (hi - lo)
    outside = observed & ((x < lo - margin) | (x > hi + margin)) & torch.isfinite(hi - lo)
    out_of_range = (
        outside.any(1) & armed & (n >= cfg.range_warmup)
        if cfg.range_margin is not None
        else torch.zeros_like(armed)
    )
    hard = out_of_range
    # Surprise in decimal digits (−log10 of the tail probability).
    if cfg.stuck_check:
        log_stuck, stuck_rows = stuck_log_tail(rows, x, observed, cfg)
        log_stuck = torch.where(armed, log_stuck, 0.0)
        hard = hard | (log_stuck <= math.log1p(-cfg.likelihood_threshold))
        log_tails.append(log_stuck)
    surprises = -torch.stack(log_tails, 1) / LN10  # (B, K): short-term [, point] [, stuck]
    cal_rows: dict[str, torch.Tensor] = {}
    if cfg.empirical_surprise:
        # The stuck tail grows by log10(1/p) digits with every reading of a run; its history may follow
        # a run only ``STUCK_MAX_STEP`` digits per reading, so a long run of a rarely repeating sensor
        # still escalates while the runs of a routinely repeating one are absorbed.
        step = torch.full((surprises.shape[1],), math.inf, dtype=F64, device=surprises.device)
        if cfg.stuck_check:
            step[-1] = STUCK_MAX_STEP
        surprises, cal_rows = empirical_surprise(rows, surprises, scored & armed, cfg, step)
        # Bonferroni: the most surprising of K recalibrated tails.
        surprise = (surprises.amax(1) - math.log10(surprises.shape[1])).clamp_min(0.0)
    else:
        surprise = surprises.amax(1)
    # A range-check hit is the top value.
    surprise = torch.where(out_of_range, math.inf, surprise)
    if cfg.alert_filter:
        surprise, prev_s = alert_filter(surprise, rows["prev_s"], cfg)
    likelihood = surprise_to_likelihood(surprise)
    new_lo = torch.where(observed, torch.minimum(lo, x), lo)
    new_hi = torch.where(observed, torch.maximum(hi, x), hi)

    new = {"cal_n": n + 1, "smooth": smoothed, **lik_rows}
    if cfg.alert_filter:
        new["prev_s"] = prev_s
    new.update(cal_rows)
    keep = {k: torch.where(_bcast(scored, v), v, rows[k]) for k, v in new.items()}
    keep["rng_lo"], keep["rng_hi"] = new_lo, new_hi
    keep.update(sx_rows)
    if cfg.stuck_check:
        keep.update(stuck_rows)
    likelihood = torch.where(scored, likelihood, torch.zeros_like(likelihood))
    smoothed = torch.where(scored, smoothed, torch.zeros_like(smoothed))

    if cfg.calibrator == "threshold":
        threshold = rows["eps"]
        decision = (smoothed > threshold) | hard
        keep["eps"] = rows["eps"]
    else:
        threshold = torch.full_like(likelihood, cfg.likelihood_threshold)
        # A stuck run or an out-of-range reading stays flagged for as long as it lasts, even where
        # the alert filter lowered its likelihood (the likelihood ranks alerts; the flag is a state).
        decision = likelihood >= cfg.likelihood_threshold
        if cfg.alert_filter:
            # One flag per episode at the decision cut as well: a reading whose predecessor was
            # already that surprising (before filtering) continues the episode, it does not start one.
            cut = -math.log10(1.0 - cfg.likelihood_threshold)
            decision = decision & ~(rows["prev_s"] >= cut)
        decision = decision | hard
    return CalibrationOut(smoothed, threshold, likelihood, decision & scored & armed, keep, seasonal_won)


def _bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def update_threshold_window(
    win: torch.Tensor,
    eps: torch.Tensor,
    rows: torch.Tensor,
    smoothed: torch.Tensor,
    cal_n: torch.Tensor,
    cfg: ScorerConfig,
) -> None:
    """Append ``smoothed`` to the rings of ``rows`` in place and re-fit ε for rows that are due.

    ``cal_n`` is each row's count of scored readings *including* this one. ``win`` (D, W) and
    ``eps`` (D,) are the store's full columns.
    """
    w = cfg.threshold_window
    pos = ((cal_n - 1) % w).long()
    win[rows, pos] = smoothed.to(win.dtype)
    due = (cal_n % cfg.threshold_every == 0) & (cal_n >= min(w, 2 * cfg.threshold_every))
    if bool(due.any()):
        due_rows = rows[due]
        eps[due_rows] = fit_threshold(win[due_rows].to(F64), cal_n[due], cfg)


def fit_threshold(win: torch.Tensor, cal_n: torch.Tensor, cfg: ScorerConfig) -> torch.Tensor:
    """Telemanom-style non-parametric threshold for each row of ``win`` (n, W) ring buffers.

    ``cal_n`` (n,) says how many scores were written (the ring is full once ``cal_n ≥ W``).
    """
    w = win.shape[1]
    filled = torch.clamp(cal_n, max=w).long()
    # Chronological order: the oldest entry sits at cal_n % W once the ring has wrapped.
    start = torch.where(cal_n >= w, cal_n % w, torch.zeros_like(cal_n)).long()
    idx = (start[:, None] + torch.arange(w)[None, :]) % w
    e = torch.gather(win, 1, idx)
    valid = torch.arange(w)[None, :] < filled[:, None]
    cnt = filled.to(F64)
    mu = torch.where(valid, e, 0).sum(1) / cnt
    sigma = torch.sqrt((torch.where(valid, (e - mu[:, None]) ** 2, 0)).sum(1) / cnt)

    zs = torch.arange(cfg.z_min, cfg.z_max + 1e-9, cfg.z_step, dtype=F64)
    eps_z = mu[:, None] + zs[None, :] * sigma[:, None]  # (n, Z)
    above = (e[:, None, :] > eps_z[:, :, None]) & valid[:, None, :]  # (n, Z, W)
    below = valid[:, None, :] & ~above
    n_above = above.sum(2).to(F64)
    n_below = below.sum(2).to(F64).clamp_min(1)
    e3 = e[:, None, :].expand_as(above)
    mean_below = torch.where(below, e3, 0).sum(2) / n_below
    std_below = torch.sqrt(torch.where(below, (e3 - mean_below[..., None]) ** 2, 0).sum(2) / n_below)
    prev = torch.nn.functional.pad(above[..., :-1], (1, 0), value=False)
    n_seq = (above & ~prev).sum(2).to(F64)
    tiny = 1e-12
    mean_delta = (mu[:, None] - mean_below) / (mu[:, None] + tiny)
    sd_delta = (sigma[:, None] - std_below) / (sigma[:, None] + tiny)
    score = (mean_delta + sd_delta) / (n_seq**2 + n_above).clamp_min(1)
    ok = (n_above > 0) & (n_seq <= cfg.max_sequences) & (n_above < 0.5 * cnt[:, None])
    score = torch.where(ok, score, -math.inf)
    # Ties go to the larger z (the more conservative threshold): argmax over the reversed z axis.
    best_rev = torch.argmax(torch.flip(score, [1]), dim=1)
    best = zs.numel() - 1 - best_rev
    any_ok = ok.any(1)
    z_best = torch.where(any_ok, zs[best], zs[-1])
    eps = mu + z_best * sigma
    nominal = torch.where(valid & (e <= eps[:, None]), e, -math.inf).amax(1)
    eps = torch.maximum(eps, nominal / (1 - cfg.prune_p))
    return eps.clamp_min(cfg.min_threshold)
