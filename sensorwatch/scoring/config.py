"""Every tunable of the streaming scorer, in one validated object with documented defaults.

>>> from sensorwatch.scoring.config import ScorerConfig
>>> cfg = ScorerConfig(calibrator="threshold", warmup=10)
>>> cfg.calibrator, cfg.warmup, cfg.score_c
('threshold', 10, 2.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CalibratorName = Literal["likelihood", "threshold"]
CALIBRATORS: tuple[CalibratorName, ...] = ("likelihood", "threshold")
#: Most bins per seasonal period (one week of minutes): the ring is per device and channel.
MAX_SEASON_BINS = 10_080


class ScorerConfig(BaseModel):
    """Parameters of :class:`~sensorwatch.scoring.scorer.StreamScorer` (all per device, all streaming)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- decision -------------------------------------------------------------------------------
    calibrator: CalibratorName = Field(
        "likelihood",
        description="What decides is_anomaly: 'likelihood' (anomaly likelihood ≥ likelihood_threshold, "
        "Numenta-style) or 'threshold' (smoothed score above the dynamic threshold, Telemanom-style).",
    )
    warmup: int = Field(
        64, ge=0, description="Readings after a device starts (or a gap reset) with no alerts."
    )
    # --- raw score --------------------------------------------------------------------------------
    score_c: float = Field(
        2.0, gt=0, description="Raw score = 1 − exp(−(z/c)²/2) of the channel-combined residual z."
    )
    recalibrate_window: int | None = Field(
        1000,
        ge=2,
        description="Online recalibration of residuals: z is divided by the device's running RMS of z "
        "over this horizon (readings), so a model's over/under-confident scale is corrected per device "
        "and channel; None trusts the model's scale.",
    )
    adapt_lags: int | None = Field(
        4,
        ge=1,
        le=16,  # components.adapt.MAX_LAGS
        description="Online adaptation: each channel's forecast is corrected by a linear function, fitted "
        "per device by recursive least squares, of its last this-many values relative to the model's "
        "forecast (a sharper forecast: every check sees smaller residuals). None: the model alone.",
    )
    # --- gaps and sampling ------------------------------------------------------------------------
    max_gap_s: float | None = Field(
        21600.0, gt=0, description="A gap longer than this (seconds) resets the hidden state; None: never."
    )
    dt_window: int = Field(100, ge=1, description="Horizon (readings) of the typical-interval estimate.")
    dt_clip: float = Field(5.0, gt=0, description="Clip of the Δt feature log(Δt / typical Δt).")
    # --- per-device normalisation -----------------------------------------------------------------
    norm_window: int = Field(
        10_000,
        ge=1,
        description="Horizon (readings) of the running mean/std normaliser (exact mean before it).",
    )
    std_floor_rel: float = Field(1e-3, ge=0, description="Normaliser std floor, relative to |running mean|.")
    std_floor_abs: float = Field(1e-6, gt=0, description="Normaliser std floor, absolute.")
    # --- smoothing and dynamic threshold (calibrator 'threshold') ---------------------------------
    smoothing_alpha: float = Field(0.3, gt=0, le=1, description="EWMA weight of the newest raw score.")
    threshold_window: int = Field(512, ge=8, description="Trailing smoothed scores the threshold is fit on.")
    threshold_every: int = Field(64, ge=1, description="Re-fit the threshold every K readings per device.")
    z_min: float = Field(2.5, gt=0, description="Smallest z tried in ε = μ + zσ.")
    z_max: float = Field(12.0, gt=0, description="Largest z tried (and the fallback when no split helps).")
    z_step: float = Field(0.5, gt=0, description="Step between the z values tried.")
    max_sequences: int = Field(5, ge=1, description="A split with more anomalous sequences is not chosen.")
    prune_p: float = Field(
        0.13, ge=0, lt=1, description="Minor-peak pruning: flag only scores ≥ max nominal score / (1 − p)."
    )
    min_threshold: float = Field(0.05, ge=0, le=1, description="Floor of the dynamic threshold.")
    # --- anomaly likelihood -----------------------------------------------------------------------
    likelihood_short: int = Field(10, ge=1, description="Readings in the short-term mean of raw scores.")
    likelihood_long: int = Field(
        2000, ge=2, description="Horizon (readings) of the long-term distribution of short-term means."
    )
    likelihood_std_floor: float = Field(0.005, gt=0, description="Floor of the long-term std.")
    likelihood_threshold: float = Field(
        0.9999,
        gt=0,
        lt=1,
        description="Decision cut for calibrator 'likelihood' (is_anomaly = likelihood ≥ this). The "
        "likelihood is 1 − 10^(−S) for a surprise of S ≤ 8 decimal digits (0.9999 ⇔ S = 4), "
        "compressed above 8 so it stays < 1 and tie-free; exactly 1 only for a range-check hit.",
    )
    range_margin: float | None = Field(
        0.05,
        ge=0,
        description="After warm-up, a value outside the range seen so far by more than this fraction of "
        "the range gets likelihood 1 (and is an anomaly); None disables the range check.",
    )
    point_likelihood: bool = Field(
        False,
        description="Also give each reading the likelihood of its own residual, 1 − P(|Z| ≥ z_eq) under the "
        "recalibrated Gaussian: an isolated in-range spike barely moves a 10-reading mean, this catches it. "
        "Off by default: on heavy-tailed real series every large residual becomes an alert (NAB −64 "
        "measured offline).",
    )
    spike_z: float | None = Field(
        5.0,
        gt=0,
        description="After warm-up, a reading whose forecast residual on any channel is at least this many "
        "robust standard deviations of the device's own residuals is an anomaly at that reading: a hard "
        "hit of the decision, not of the likelihood (NAB scores the likelihood). None disables it.",
    )
    range_span: float | None = Field(
        10.0,
        gt=0,
        description="A channel's range check arms only once the range seen spans at least this many robust "
        "standard deviations of the forecast's residuals (the spike check's unit; no condition with the "
        "spike check off): a range no wider than the noise's own extremes (about 6-9 σ) means nothing "
        "yet. None: no such condition.",
    )
    range_warmup: int = Field(
        300, ge=0, description="Readings a device must have before the range check is armed."
    )
    stuck_check: bool = Field(
        True,
        description="Stuck-sensor check: a run of r identical values on a channel whose repeat rate so far "
        "is p has likelihood 1 − p^r (Laplace-smoothed p), so a noisy sensor that freezes is caught.",
    )
    seasonal_check: bool = Field(
        True,
        description="Seasonal context check (likelihood calibrator): a second, model-independent expert "
        "compares each reading with the device's mean reading in the same time bin one seasonal period "
        "earlier (after removing the recent level difference) and gives it its own anomaly likelihood; "
        "the more surprising of the forecast and seasonal likelihoods counts, less log10(2) digits "
        "(Bonferroni) where both speak. Catches contextual anomalies a one-step forecast misses (a normal "
        "value at the wrong time of day).",
    )
    seasonal_return: bool = Field(
        True,
        description="Seasonal check: a reading back at the level the device had before a temporary move "
        "(a slow EWMA of the level offset, ~500 readings) is judged against that level, so the end of a "
        "level shift, drift or stuck run is not a contextual anomaly of its own.",
    )
    seasonal_period_s: float = Field(86_400.0, gt=0, description="Seasonal period (seconds) of the check.")
    seasonal_bin_s: float = Field(
        3600.0,
        gt=0,
        description="Time bin (seconds) of the seasonal check's per-device ring of bin means "
        "(period / bin + 1 slots per channel: 25 with the defaults, ~0.4 KB per univariate device).",
    )
    seasonal_level_alpha: float = Field(
        0.1,
        gt=0,
        le=1,
        description="EWMA weight of the newest level difference (reading − same bin a period earlier) that "
        "the seasonal check removes, so a level shift that has persisted stops being surprising.",
    )
    alert_filter: bool = Field(
        True,
        description="Numenta's alert filter: a reading at least filter_red digits surprising right after "
        "one that also was (before filtering) is lowered below filter_yellow digits — one alert per "
        "episode instead of a run of them (+19 NAB points measured offline). Range-check hits are exempt.",
    )
    filter_red: float = Field(
        5.0, gt=0, description="Surprise (decimal digits) of a 'red' reading (likelihood 0.99999)."
    )
    filter_yellow: float = Field(
        3.0,
        gt=0,
        description="A filtered reading's surprise is mapped into [0, filter_yellow) digits "
        "(likelihood below 0.999), order-preserving so that no ties are created.",
    )
    max_abs_value: float = Field(
        1e15,
        gt=0,
        description="Readings with a larger |value| are rejected (value_too_large): beyond it "
        "squares and variances lose all precision.",
    )
    max_future_s: float | None = Field(
        None,
        gt=0,
        description="Readings stamped more than this many seconds after the scorer's clock are rejected "
        "(ts_out_of_range): one far-future reading would otherwise make its device refuse every real "
        "one as out_of_order. None (the library's default, whose clock is monotonic): no check; the "
        "service sets it from SENSORWATCH_MAX_FUTURE_S with the wall clock.",
    )
    # --- state store ------------------------------------------------------------------------------
    max_devices: int = Field(100_000, ge=1, description="Devices kept in memory (LRU eviction beyond).")
    device_ttl_s: float | None = Field(
        None, gt=0, description="Evict devices idle for this long; None: never."
    )
    state_chunk: int = Field(1024, ge=1, description="Rows the state tensors grow by.")

    @model_validator(mode="after")
    def _check(self) -> ScorerConfig:
        if self.z_max < self.z_min:
            raise ValueError("z_max must be >= z_min")
        if self.filter_yellow > self.filter_red:
            raise ValueError("filter_yellow must be <= filter_red")
        bins = self.seasonal_period_s / self.seasonal_bin_s
        if abs(bins - round(bins)) > 1e-9 * bins or not 1 <= round(bins) <= MAX_SEASON_BINS:
            raise ValueError(
                f"seasonal_period_s / seasonal_bin_s must be a whole number of bins in 1..{MAX_SEASON_BINS}"
            )
        return self


def config_with(overrides: Sequence[str] = (), **base: Any) -> ScorerConfig:
    """A :class:`ScorerConfig` from ``base`` fields plus ``KEY=VALUE`` overrides (command lines).

    Values are parsed by the field's type (``none`` is None); an unknown key or a bad value is a
    ``ValueError`` naming it.

    >>> cfg = config_with(["seasonal_check=false", "seasonal_bin_s=1800", "range_margin=none"], warmup=10)
    >>> cfg.seasonal_check, cfg.seasonal_bin_s, cfg.range_margin, cfg.warmup
    (False, 1800.0, None, 10)
    >>> config_with(["no_such=1"])
    Traceback (most recent call last):
    ...
    ValueError: unknown scorer setting 'no_such'
    """
    fields = dict(base)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"scorer setting {item!r} is not KEY=VALUE")
        if key not in ScorerConfig.model_fields:
            raise ValueError(f"unknown scorer setting {key!r}")
        fields[key] = None if value.strip().lower() in ("none", "null") else value.strip()
    return ScorerConfig(**fields)
