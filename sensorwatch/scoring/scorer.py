"""StreamScorer: many devices' readings → one batched forecaster step → calibrated results.

For each call of :meth:`StreamScorer.step`:

1. **Validate** every reading (vectorised): parse-time rejections, non-finite values, all channels
   missing, timestamps not after the device's last one (``out_of_order``) or repeating one
   (``duplicate_timestamp``). Rejected readings never touch state.
2. **Order**: a device's accepted readings are applied in timestamp order, in *waves*: wave k holds
   the k-th reading of every device in the batch, so one wave touches each device at most once and
   is a single batched tensor step. A batch of distinct devices is one wave.
3. **Per wave**: gather the devices' rows → residuals against the prediction stored at their last
   reading → raw score, calibration → normalise + Δt features → one forecaster step → store the
   prediction for the next reading → scatter rows back.

The result is columnar, one entry per input reading in input order (:class:`StepResult`).

>>> import numpy as np
>>> from sensorwatch import StreamScorer, ReadingBatch
>>> scorer = StreamScorer.builtin()
>>> res = scorer.step(ReadingBatch(["a", "b", "a"], [1.0, 1.0, 2.0], [[1.0], [5.0], [1.1]]))
>>> res.accepted.tolist(), res.warming_up.tolist()
([True, True, True], [True, True, True])
>>> res = scorer.step(ReadingBatch(["a"], [2.0], [[1.0]]))
>>> res.accepted.tolist(), res.reason.tolist()
([False], ['duplicate_timestamp'])
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sensorwatch.model.forecaster import BUILTIN_VERSION, Forecaster, builtin_model
from sensorwatch.scoring import calibration as cal
from sensorwatch.scoring import features as feat
from sensorwatch.scoring.batch import Reading, ReadingBatch, RejectReason, StepResult
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.state.store import ColumnSpec, DeviceStateStore, StateCopy

F64 = torch.float64
#: Version of the meaning of the state columns: a snapshot of another version is refused (and the
#: service moves it aside). 2: residual RMS in raw units, seasonal check.
STATE_VERSION = 2


def core_columns(model: Forecaster) -> dict[str, ColumnSpec]:
    c = model.config.channels
    cols = {
        "last_ts": ColumnSpec((), F64, -math.inf),
        "count": ColumnSpec((), F64),
        "since_reset": ColumnSpec((), F64),
        "has_pred": ColumnSpec((), torch.bool),
        "last_likelihood": ColumnSpec((), F64, math.nan),
        "pred_mean": ColumnSpec((c,), F64),
        # The model's predicted scale in normalised units; times the normaliser's std (unchanged
        # since the prediction) it is the predicted scale in raw units.
        "pred_rel": ColumnSpec((c,), F64, 1.0),
    }
    for name, shape in model.state_shapes.items():
        cols[name] = ColumnSpec(shape, torch.float32)
    return cols


class StreamScorer:
    """Per-device streaming anomaly scorer around one :class:`Forecaster` (see module docstring)."""

    def __init__(
        self,
        model: Forecaster,
        config: ScorerConfig | None = None,
        *,
        model_version: str = "unversioned",
        device: torch.device | str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or ScorerConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model_version = model_version
        self.counters: Counter[str] = Counter()
        cfg = self.config
        c = model.config.channels
        columns = {**core_columns(model), **feat.feature_columns(c), **cal.calibration_columns(c, cfg)}
        if model.config.seasonal:
            columns.update(feat.seasonal_columns(c, model.config.season_bin_s))
            columns.update(feat.level_free_columns(c))
        in_place = cal.IN_PLACE_COLUMNS | feat.SEASONAL_COLUMNS
        self._gathered = [k for k in columns if k not in in_place]
        self.store = DeviceStateStore(
            columns,
            max_devices=cfg.max_devices,
            ttl_s=cfg.device_ttl_s,
            chunk=cfg.state_chunk,
            identity={
                "model": model.config.identity(),
                "calibrator": cfg.calibrator,
                "state_version": STATE_VERSION,
            },
            clock=clock,
            device=self.device,
        )
        self._last_expiry = -math.inf

    @classmethod
    def builtin(cls, channels: int = 1, config: ScorerConfig | None = None, **kw: Any) -> StreamScorer:
        """A scorer around the built-in persistence fallback (:func:`builtin_model`)."""
        kw.setdefault("model_version", BUILTIN_VERSION)
        return cls(builtin_model(channels), config, **kw)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self.model.config.names

    # ------------------------------------------------------------------ public API
    def step(self, readings: ReadingBatch | Sequence[Reading]) -> StepResult:
        """Score a batch of readings from any mix of devices; one result per reading, in input order."""
        batch = (
            readings
            if isinstance(readings, ReadingBatch)
            else ReadingBatch.from_records(readings, self.channel_names)
        )
        result = StepResult.empty(batch, self.model.config.channels, self.model_version, self.channel_names)
        if len(batch) == 0:
            return result
        self._maybe_expire()
        plan = self._plan(batch, result)
        if plan is not None:
            dev_rows, inv, waves = plan
            with torch.inference_mode():
                for sel in waves:
                    self._wave(batch, result, sel, dev_rows[inv[sel]])
        self.counters.update(r for r in result.reason[~result.accepted].tolist() if r is not None)
        self.counters["scored"] += int(result.accepted.sum())
        self.counters["anomalies"] += int(result.is_anomaly.sum())
        self.counters["gap_resets"] += int(result.gap_reset.sum())
        return result

    def reset(self, device_id: str) -> bool:
        """Forget a device's state (its next reading starts fresh). True if it was known."""
        return self.store.reset(device_id)

    def device_info(self, device_id: str) -> dict[str, Any] | None:
        """What the scorer knows of one device (None if it has no state)."""
        row = self.store.row_of(device_id)
        if row is None:
            return None
        col = self.store.columns
        lik = float(col["last_likelihood"][row])
        since = int(col["since_reset"][row])
        return {
            "device_id": device_id,
            "count": int(col["count"][row]),
            "last_ts": float(col["last_ts"][row]),
            "warming_up": since <= self.config.warmup,
            "readings_since_reset": since,
            "last_likelihood": lik if math.isfinite(lik) else None,
            "model_version": self.model_version,
        }

    def fork(self, device_ids: Sequence[str]) -> StreamScorer:
        """A scratch scorer with the same model and config holding copies of these devices' state.

        Stepping the fork never touches this scorer (dry runs).
        """
        other = StreamScorer(self.model, self.config, model_version=self.model_version, device=self.device)
        known = [d for d in dict.fromkeys(device_ids) if d in self.store]
        if known:
            src = torch.from_numpy(self.store.lookup(known)).to(self.device)
            dst = torch.from_numpy(other.store.rows_for(known)).to(self.device)
            for name, t in self.store.columns.items():
                other.store.columns[name][dst] = t[src]
        return other

    def swap_model(self, model: Forecaster, model_version: str) -> bool:
        """Serve ``model`` from the next step on. Device state is kept when the architecture matches
        (returns True); otherwise every device starts afresh with warm-up (returns False)."""
        model = model.to(self.device).eval()
        if model.config.identity() == self.model.config.identity():
            self.model, self.model_version = model, model_version
            return True
        fresh = StreamScorer(
            model, self.config, model_version=model_version, device=self.device, clock=self.store.clock
        )
        evictions = self.store.evictions
        self.model, self.model_version, self.store = fresh.model, model_version, fresh.store
        self._gathered = fresh._gathered
        self.store.evictions = evictions
        return False

    def snapshot(self, path: str) -> None:
        self.capture().write(path)

    def capture(self, extra: dict[str, Any] | None = None) -> StateCopy:
        """An immutable copy of all device state (and the scorer's own clock of the last idle-TTL sweep),
        to be written outside the caller's lock."""
        last = self._last_expiry if math.isfinite(self._last_expiry) else None
        return self.store.capture({"model_version": self.model_version, "last_expiry": last, **(extra or {})})

    def restore(self, path: str) -> dict[str, Any]:
        extra = self.store.restore(path)
        last = extra.get("last_expiry")
        self._last_expiry = -math.inf if last is None else float(last)
        return extra

    # ------------------------------------------------------------------ planning
    def _plan(
        self, batch: ReadingBatch, result: StepResult
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
        """Validate, allocate rows and split accepted readings into waves (indices into the batch)."""
        n = len(batch)
        ok = np.fromiter((r is None for r in batch.reject), dtype=bool, count=n)
        vals = batch.values
        if vals.shape[1] != self.model.config.channels:
            result.reason[ok] = RejectReason.WRONG_CHANNEL_COUNT.value
            return None
        self._reject(result, ok, np.isinf(vals).any(1), RejectReason.NON_FINITE)
        with np.errstate(invalid="ignore"):
            huge = (np.abs(vals) > self.config.max_abs_value).any(1)
        self._reject(result, ok, huge, RejectReason.VALUE_TOO_LARGE)
        self._reject(result, ok, np.isnan(vals).all(1), RejectReason.NO_VALUES)
        self._reject(result, ok, ~np.isfinite(batch.ts), RejectReason.BAD_TIMESTAMP)

        distinct = list(dict.fromkeys(batch.device_ids))
        if "" in distinct or None in distinct:
            bad = np.array([d is None or d == "" for d in batch.device_ids])  # rare path
            self._reject(result, ok, bad, RejectReason.BAD_DEVICE_ID)
        if len(distinct) == n:
            inv = np.arange(n)
        else:
            code = {d: i for i, d in enumerate(distinct)}
            inv = np.fromiter(map(code.__getitem__, batch.device_ids), dtype=np.int64, count=n)
        known = self.store.lookup(distinct)
        last_ts = np.full(len(distinct), -np.inf)
        if (known >= 0).any():
            kr = known[known >= 0]
            last_ts[known >= 0] = self.store.columns["last_ts"][torch.from_numpy(kr)].cpu().numpy()

        rank = np.zeros(n, dtype=np.int64)
        if len(distinct) == n:
            self._reject(result, ok, batch.ts < last_ts, RejectReason.OUT_OF_ORDER)
            self._reject(result, ok, batch.ts == last_ts, RejectReason.DUPLICATE_TIMESTAMP)
        else:
            self._order(batch.ts, inv, last_ts, ok, rank, result)
        if not ok.any():
            return None

        used = np.unique(inv[ok])
        if used.size > self.store.max_devices:
            over = np.isin(inv, used[self.store.max_devices :])
            self._reject(result, ok, over, RejectReason.CAPACITY)
            used = used[: self.store.max_devices]
        dev_rows = np.full(len(distinct), -1, dtype=np.int64)
        dev_rows[used] = self.store.rows_for([distinct[i] for i in used.tolist()])
        result.accepted[:] = ok
        idx = np.flatnonzero(ok)
        if rank[idx].max(initial=0) == 0:
            return dev_rows, inv, [idx]
        r = rank[idx]
        order = np.argsort(r, kind="stable")
        bounds = np.searchsorted(r[order], np.arange(1, r.max() + 1))
        return dev_rows, inv, np.split(idx[order], bounds)

    @staticmethod
    def _reject(result: StepResult, ok: np.ndarray, bad: np.ndarray, reason: RejectReason) -> None:
        hit = ok & bad
        if hit.any():
            result.reason[hit] = reason.value
            ok &= ~hit

    def _order(
        self,
        ts: np.ndarray,
        inv: np.ndarray,
        last_ts: np.ndarray,
        ok: np.ndarray,
        rank: np.ndarray,
        result: StepResult,
    ) -> None:
        """Timestamp checks and per-device ranks when a device has several readings in the batch."""
        idx = np.flatnonzero(ok)
        order = idx[np.lexsort((idx, ts[idx], inv[idx]))]  # by device, then ts, then input position
        d, t = inv[order], ts[order]
        same_dev = np.r_[False, d[1:] == d[:-1]]
        late = t < last_ts[d]
        dup = (same_dev & np.r_[False, t[1:] == t[:-1]]) | (t == last_ts[d])
        self._reject(result, ok, _scatter_mask(order, late, len(ok)), RejectReason.OUT_OF_ORDER)
        self._reject(result, ok, _scatter_mask(order, dup & ~late, len(ok)), RejectReason.DUPLICATE_TIMESTAMP)
        keep = ~(late | dup)
        order, d = order[keep], d[keep]
        # Rank within device: position minus the position of the device's first accepted reading.
        starts = np.r_[True, d[1:] != d[:-1]]
        first_pos = np.maximum.accumulate(np.where(starts, np.arange(d.size), 0))
        rank[order] = np.arange(d.size) - first_pos

    def _maybe_expire(self) -> None:
        if self.config.device_ttl_s is None:
            return
        now = self.store.clock()
        if now - self._last_expiry >= min(1.0, self.config.device_ttl_s / 10):
            self._last_expiry = now
            self.store.expire(now)

    # ------------------------------------------------------------------ one wave
    def _wave(self, batch: ReadingBatch, result: StepResult, sel: np.ndarray, rows_np: np.ndarray) -> None:
        cfg, dev = self.config, self.device
        rows = torch.from_numpy(rows_np).to(dev)
        g = {k: self.store.columns[k].index_select(0, rows) for k in self._gathered}
        x = torch.from_numpy(batch.values[sel]).to(dev)
        ts = torch.from_numpy(batch.ts[sel]).to(dev)

        observed = ~torch.isnan(x)
        fresh = g["count"] == 0
        dt = torch.where(fresh, torch.full_like(ts, math.nan), ts - g["last_ts"])
        gap = ~fresh & (dt > cfg.max_gap_s) if cfg.max_gap_s is not None else torch.zeros_like(fresh)
        has_pred = g["has_pred"] & ~gap
        scored_ch = observed & has_pred[:, None]
        since = torch.where(gap, torch.ones_like(g["since_reset"]), g["since_reset"] + 1)
        warming = since <= cfg.warmup
        # Residual scale is learnt only after warm-up: the normaliser is still settling before.
        e_rel = (x - g["pred_mean"]) / g["pred_rel"]
        norm_scale = feat.floored_std(torch.sqrt(g["norm_var"]), g["norm_mean"], cfg)
        z, upd_z = cal.recalibrate(
            g, e_rel / norm_scale, e_rel, scored_ch, scored_ch & ~warming[:, None], cfg
        )
        raw, attribution = cal.raw_score(z, scored_ch, cfg.score_c)
        sx_raw = sx_scored = None
        upd_sx: dict[str, torch.Tensor] = {}
        if cfg.seasonal_check:
            z_sx, sx_ch, upd_sx = cal.seasonal_residual(self.store.columns, rows, g, ts, x, observed, cfg)
            sx_raw, sx_attr = cal.raw_score(z_sx, sx_ch, cfg.score_c)
            sx_scored = sx_ch.any(1)
        co = cal.calibrate(g, raw, x, observed, has_pred, ~warming, cfg, sx_raw, sx_scored)
        if cfg.seasonal_check:
            attribution = torch.where(co.seasonal_won[:, None], sx_attr, attribution)

        # Impute missing channels with the prediction (or the running mean before the first one).
        x_filled = torch.where(observed, x, torch.where(has_pred[:, None], g["pred_mean"], g["norm_mean"]))
        x_norm, centre, scale, upd = feat.normalise(g, x_filled, observed, cfg)
        dt_feat, upd_dt = feat.delta_t_feature(g, dt, ~gap, cfg)
        seasonal: torch.Tensor | None = None
        upd_step: dict[str, torch.Tensor] = {}
        if self.model.config.seasonal:
            # After a gap reset the step is unknown (0), as for a first reading.
            prev = {**upd_dt, "last_x": torch.where(gap[:, None], math.nan, g["last_x"])}
            seasonal, upd_step = feat.seasonal_inputs(
                self.store.columns,
                rows,
                prev,
                ts,
                x,
                x_filled,
                observed,
                scale,
                self.model.config.season_bin_s,
            )
        state = {k: torch.where(gap[:, None, None], 0.0, g[k]) for k in self.model.state_shapes}
        mean_n, scale_n, new_state = self.model.step(
            feat.assemble(x_norm, observed, dt_feat, seasonal), state
        )

        new = {
            **co.rows,
            **upd_z,
            **upd_sx,
            **upd,
            **upd_dt,
            **upd_step,
            **new_state,
            "last_ts": ts,
            "count": g["count"] + 1,
            "since_reset": since,
            "last_likelihood": torch.where(has_pred, co.likelihood, g["last_likelihood"]),
            "has_pred": torch.ones_like(has_pred),
            "pred_mean": mean_n.to(F64) * scale + centre,
            "pred_rel": scale_n.to(F64),
        }
        for k in self._gathered:
            self.store.columns[k].index_copy_(0, rows, new[k].to(self.store.columns[k].dtype))
        if cfg.calibrator == "threshold" and bool(has_pred.any()):
            cal.update_threshold_window(
                self.store.columns["win"],
                self.store.columns["eps"],
                rows[has_pred],
                co.smoothed[has_pred],
                co.rows["cal_n"][has_pred],
                cfg,
            )

        none = ~has_pred
        result.predicted[sel] = torch.where(none[:, None], math.nan, g["pred_mean"]).cpu().numpy()
        result.z[sel] = torch.where(scored_ch, z, math.nan).cpu().numpy()
        result.raw_score[sel] = torch.where(none, 0.0, raw).cpu().numpy()
        result.smoothed_score[sel] = co.smoothed.cpu().numpy()
        result.threshold[sel] = co.threshold.cpu().numpy()
        result.likelihood[sel] = co.likelihood.cpu().numpy()
        result.is_anomaly[sel] = co.decision.cpu().numpy()
        result.attribution[sel] = attribution.cpu().numpy()
        result.warming_up[sel] = warming.cpu().numpy()
        result.gap_reset[sel] = gap.cpu().numpy()
        result.imputed[sel] = (~observed).cpu().numpy()


def _scatter_mask(order: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[order[mask]] = True
    return out
