"""StreamScorer: many devices' readings → one batched forecaster step per wave → calibrated results.

For each call of :meth:`StreamScorer.step`:

1. **Validate** every reading (vectorised): parse-time rejections, non-finite values, all channels
   missing, timestamps not after the device's last one (``out_of_order``) or repeating one
   (``duplicate_timestamp``). Rejected readings never touch state.
2. **Order**: a device's accepted readings are applied in timestamp order, in *waves*: wave k holds
   the k-th reading of every device in the batch, so one wave touches each device at most once.
3. **Gather** the batch's devices' state rows once (one copy per packed tensor, see
   :mod:`sensorwatch.scoring.state`).
4. **Per wave**: one fused compiled call scores every reading through the components
   (:mod:`sensorwatch.scoring.kernel`) and builds the forecaster inputs; one batched forecaster
   step; one compiled call keeps the forecasts for the next reading.
5. **Scatter** the rows back — only when every wave succeeded. The memory rings are written in
   place through an undo log, rolled back when a wave fails: a failed batch leaves every device as
   it was, and the caller's error says nothing was scored.

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
from sensorwatch.scoring import components, kernel
from sensorwatch.scoring.batch import Reading, ReadingBatch, RejectReason, StepResult
from sensorwatch.scoring.components.threshold import z_grid
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.state import Store
from sensorwatch.state.store import ColumnSpec, DeviceStateStore, StateCopy

F64 = torch.float64
#: Version of the meaning of the state: a snapshot of another version is refused (and the service
#: moves it aside). 2: residual RMS in raw units, seasonal check. 3: components' fields packed into
#: a few tensors (``state``, ``memory32``, ``memory64``, ``hidden``) with the layout in the identity.
STATE_VERSION = 3
#: The packed stores, in the store's column order.
PACKED: tuple[Store, ...] = ("state", "memory32", "memory64")


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
        self.model = _ready(model, self.device)
        self.model_version = model_version
        self.counters: Counter[str] = Counter()
        self._last_expiry = -math.inf
        self._build(self.model, clock)

    def _build(self, model: Forecaster, clock: Callable[[], float]) -> None:
        cfg = self.config
        self.setup = components.Setup(cfg, model.config)
        self.layout = components.layout(self.setup)
        self._params = kernel.params(self.setup, model.config.input_size)
        self._offsets = components.offsets(self.layout)
        self._zs = z_grid(cfg)
        self._writes = kernel.writes_per_reading(self.setup)
        dtypes = {"state": F64, "memory32": torch.float32, "memory64": F64}
        columns: dict[str, ColumnSpec] = {
            name: ColumnSpec(
                (max(1, self.layout.widths[name]),),
                dtypes[name],
                template=np.resize(self.layout.template(name), max(1, self.layout.widths[name])),
            )
            for name in PACKED
        }
        for name, shape in model.state_shapes.items():
            columns[f"hidden.{name}"] = ColumnSpec(shape, torch.float32)
        self._state_names = tuple(model.state_shapes)
        self.store = DeviceStateStore(
            columns,
            max_devices=cfg.max_devices,
            ttl_s=cfg.device_ttl_s,
            chunk=cfg.state_chunk,
            identity={
                "model": model.config.identity(),
                "calibrator": cfg.calibrator,
                "state_version": STATE_VERSION,
                "layout": self.layout.describe(),
            },
            clock=clock,
        )

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
            self._run(batch, result, *plan)
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
        st, o = self.store.columns["state"][row], self.layout.offsets["core"]
        lik = float(st[o["last_likelihood"]])
        since = int(st[o["since_reset"]])
        return {
            "device_id": device_id,
            "count": int(st[o["count"]]),
            "last_ts": float(st[o["last_ts"]]),
            "warming_up": since <= self.config.warmup,
            "readings_since_reset": since,
            "last_likelihood": lik if math.isfinite(lik) else None,
            "model_version": self.model_version,
        }

    def fork(self, device_ids: Sequence[str]) -> StreamScorer:
        """A scratch scorer with the same model and config holding copies of these devices' state.

        Stepping the fork never touches this scorer (dry runs).
        """
        other = StreamScorer(
            self.model,
            self.config,
            model_version=self.model_version,
            device=self.device,
            clock=self.store.clock,
        )
        known = [d for d in dict.fromkeys(device_ids) if d in self.store]
        if known:
            src = torch.from_numpy(self.store.lookup(known))
            dst = torch.from_numpy(other.store.rows_for(known))
            for name, t in self.store.columns.items():
                other.store.columns[name][dst] = t[src]
        return other

    def state_of(self, device_id: str) -> dict[str, np.ndarray] | None:
        """A copy of one device's state by field name (``normaliser.mean``, ``seasonal_check.level``,
        …, and the forecaster's ``hidden.h``/``hidden.c``); None if the device has no state."""
        row = self.store.row_of(device_id)
        if row is None:
            return None
        cols = self.store.columns
        out = self.layout.unpack({name: cols[name][row].numpy() for name in PACKED})
        for name in self._state_names:
            out[f"hidden.{name}"] = cols[f"hidden.{name}"][row].numpy().copy()
        return out

    def swap_model(self, model: Forecaster, model_version: str) -> bool:
        """Serve ``model`` from the next step on. Device state is kept when the architecture matches
        (returns True); otherwise every device starts afresh with warm-up (returns False)."""
        model = _ready(model, self.device)
        if model.config.identity() == self.model.config.identity():
            self.model, self.model_version = model, model_version
            return True
        evictions = self.store.evictions
        self.model, self.model_version = model, model_version
        self._build(model, self.store.clock)
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
        return self._restored(self.store.restore(path))

    def load_snapshot(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str
    ) -> dict[str, Any]:
        """:meth:`restore` from a snapshot already read (``DeviceStateStore.read_snapshot_bytes`` of a
        cluster checkpoint); ``name`` is what an error calls it."""
        return self._restored(self.store.load(tensors, metadata, name))

    def _restored(self, extra: dict[str, Any]) -> dict[str, Any]:
        last = extra.get("last_expiry")
        self._last_expiry = -math.inf if last is None else float(last)
        return extra

    # ------------------------------------------------------------------ planning
    def _plan(
        self, batch: ReadingBatch, result: StepResult
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
        """Validate, allocate rows and split accepted readings into waves (indices into the batch)."""
        n = len(batch)
        ok: np.ndarray = batch.reject == None  # noqa: E711  (elementwise over the object array)
        vals = batch.values
        if vals.shape[1] != self.model.config.channels:
            result.reason[ok] = RejectReason.WRONG_CHANNEL_COUNT.value
            return None
        failed = np.zeros(n, dtype=np.int8)
        if kernel.validate(vals, batch.ts, self.config.max_abs_value, failed):
            for k, reason in enumerate(kernel.VALUE_REJECTIONS, start=1):
                self._reject(result, ok, failed == k, reason)

        if self.config.max_future_s is not None:
            late = batch.ts > self.store.clock() + self.config.max_future_s
            self._reject(result, ok, late, RejectReason.TS_OUT_OF_RANGE)
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
            last_ts[known >= 0] = self.store.columns["state"].numpy()[
                kr, self.layout.offsets["core"]["last_ts"]
            ]

        rank = np.zeros(n, dtype=np.int64)
        if len(distinct) == n:
            self._reject(result, ok, batch.ts < last_ts, RejectReason.OUT_OF_ORDER)
            self._reject(result, ok, batch.ts == last_ts, RejectReason.DUPLICATE_TIMESTAMP)
        else:
            self._order(batch.ts, inv, last_ts, ok, rank, result)
        if not ok.any():
            return None

        used = np.flatnonzero(ok) if len(distinct) == n else np.unique(inv[ok])
        if used.size > self.store.max_devices:
            over = np.isin(inv, used[self.store.max_devices :])
            self._reject(result, ok, over, RejectReason.CAPACITY)
            used = used[: self.store.max_devices]
        dev_rows = np.full(len(distinct), -1, dtype=np.int64)
        dev_rows[used] = known[used]
        new = used[known[used] < 0]
        if new.size:
            protect = known[used]
            dev_rows[new] = self.store.rows_for([distinct[i] for i in new.tolist()], protect[protect >= 0])
        self.store.touch(dev_rows[used])
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

    # ------------------------------------------------------------------ waves
    def _run(
        self,
        batch: ReadingBatch,
        result: StepResult,
        dev_rows: np.ndarray,
        inv: np.ndarray,
        waves: list[np.ndarray],
    ) -> None:
        """Gather the devices' rows, run the waves, scatter back (or roll the memory back)."""
        cols = self.store.columns
        used = np.flatnonzero(dev_rows >= 0)
        srows = dev_rows[used]
        local = np.full(len(dev_rows), -1, dtype=np.int64)
        local[used] = np.arange(used.size)
        state = cols["state"].numpy()
        mem32, mem64 = cols["memory32"].numpy(), cols["memory64"].numpy()
        st = state.take(srows, axis=0)
        hidden = {k: cols[f"hidden.{k}"].numpy().take(srows, axis=0) for k in self._state_names}
        values = np.ascontiguousarray(batch.values, dtype=np.float64)
        ts = np.ascontiguousarray(batch.ts, dtype=np.float64)
        logs: list[tuple[np.ndarray, np.ndarray, int]] = []
        plan = self._sequences(waves, local[inv], values, ts, used.size) if len(waves) > 1 else None
        try:
            with torch.inference_mode():
                if plan is not None:
                    self._run_sequences(plan, st, srows, values, ts, mem32, mem64, hidden, result, logs)
                for sel in waves if plan is None else ():
                    loc = local[inv[sel]]
                    gaps = self._wave(
                        st, loc, srows[loc], sel, values, ts, mem32, mem64, hidden, result, logs
                    )
                    result.gap_reset[sel] = gaps
        except BaseException:
            for undo, undo_n, n in reversed(logs):
                kernel.rollback(mem32, mem64, undo, undo_n, n)
            raise
        state[srows] = st
        for k, h in hidden.items():
            cols[f"hidden.{k}"].numpy()[srows] = h
        idx = np.concatenate(waves) if len(waves) > 1 else waves[0]
        result.imputed[idx] = np.isnan(values[idx])

    def _sequences(
        self, waves: list[np.ndarray], loc_of: np.ndarray, values: np.ndarray, ts: np.ndarray, devices: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(order, starts, lengths) when the batch can run as per-device sequences (kernel module's
        note): every accepted reading fully observed and no gap after a device's first reading."""
        idx = np.concatenate(waves)
        if np.isnan(values[idx]).any():
            return None
        loc = loc_of[idx]
        perm = np.argsort(loc, kind="stable")  # wave order within a device = time order
        order, dev = idx[perm], loc[perm]
        if self.config.max_gap_s is not None:
            same = dev[1:] == dev[:-1]
            if (same & (np.diff(ts[order]) > self.config.max_gap_s)).any():
                return None
        lengths = np.bincount(dev, minlength=devices).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return order, starts, lengths

    def _run_sequences(
        self,
        plan: tuple[np.ndarray, np.ndarray, np.ndarray],
        st: np.ndarray,
        srows: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        mem32: np.ndarray,
        mem64: np.ndarray,
        hidden: dict[str, np.ndarray],
        r: StepResult,
        logs: list[tuple[np.ndarray, np.ndarray, int]],
    ) -> None:
        """Features for every reading, one forecaster call per sequence length, then the scoring
        components along each sequence (kernel module's note)."""
        order, starts, lengths = plan
        n, devices, c = order.size, lengths.size, self.model.config.channels
        dev_loc = np.arange(devices, dtype=np.int64)
        feats = np.zeros((devices, int(lengths.max()), self.model.config.input_size), dtype=np.float32)
        centre, scale = np.empty((n, c)), np.empty((n, c))
        rec, rec_flags = np.empty((n, c + 2)), np.zeros((n, 3), dtype=np.bool_)
        undo, undo_n = kernel.undo_log(n, self._writes)
        logs.append((undo, undo_n, n))
        common = (
            st,
            dev_loc,
            srows,
            starts,
            lengths,
            order,
            mem32,
            mem64,
            values,
            ts,
            self._params,
            self._offsets,
        )
        kernel.sequence_features(*common, feats, centre, scale, rec, rec_flags, undo, undo_n)
        mean_n = np.empty((devices, feats.shape[1], c), dtype=np.float32)
        scale_n = np.empty_like(mean_n)
        gap0 = rec_flags[starts, 0] & (lengths > 0)
        for h in hidden.values():
            h[gap0] = 0.0  # a gap reset before the first reading: start afresh (working copies)
        # Time segments between consecutive distinct lengths: segment [prev, length) runs every device
        # whose sequence reaches ``length``, in one call, continuing from the state the previous
        # segment left. Each row's results equal one call per device up to float32 rounding (torch's
        # kernels may round differently by batch size, as grouping by equal length already could;
        # bit-identical on the CPUs measured for the shipped one layer of 32), and the sequential
        # steps are the longest sequence's, not the sum over distinct lengths (devices of a gateway
        # batch rarely share one length).
        prev = 0
        for length in np.unique(lengths).tolist():
            devs = np.flatnonzero(lengths >= length)
            whole = devs.size == devices
            state = {k: torch.from_numpy(h if whole else h[devs]).to(self.device) for k, h in hidden.items()}
            x = torch.from_numpy(np.ascontiguousarray(feats[devs, prev:length])).to(self.device)
            mean, sc, new = self.model(x, None, state)
            mean_n[devs, prev:length] = mean.cpu().numpy()
            scale_n[devs, prev:length] = sc.cpu().numpy()
            for k, h in hidden.items():
                h[devs] = new[k].cpu().numpy()
            prev = length
        kernel.sequence_score(
            *common,
            self._zs,
            mean_n,
            scale_n,
            centre,
            scale,
            rec,
            rec_flags,
            undo,
            undo_n,
            *kernel.outputs(r),
        )
        r.gap_reset[order] = rec_flags[:, 0]

    def _wave(
        self,
        st: np.ndarray,
        loc: np.ndarray,
        srow: np.ndarray,
        sel: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        mem32: np.ndarray,
        mem64: np.ndarray,
        hidden: dict[str, np.ndarray],
        r: StepResult,
        logs: list[tuple[np.ndarray, np.ndarray, int]],
    ) -> np.ndarray:
        """One wave: the fused kernel, one forecaster step, the forecasts kept (module docstring)."""
        n, c = sel.size, self.model.config.channels
        feats = np.empty((n, self.model.config.input_size), dtype=np.float32)
        centre, scale = np.empty((n, c)), np.empty((n, c))
        gaps = np.empty(n, dtype=np.bool_)
        chunks = kernel.chunks_for(n)
        undo, undo_n = kernel.undo_log(n, self._writes, chunks)
        logs.append((undo, undo_n, n))
        run = kernel.wave_parallel if chunks > 1 else kernel.wave
        run(
            st,
            loc,
            mem32,
            mem64,
            srow,
            sel,
            values,
            ts,
            self._params,
            self._offsets,
            self._zs,
            feats,
            centre,
            scale,
            gaps,
            undo,
            undo_n,
            *kernel.outputs(r),
        )
        # The wave's rows of the working copy: all of it, in order, for a batch of distinct devices.
        whole = n == st.shape[0] and bool((loc == np.arange(n)).all())
        h_in = {k: h if whole else h[loc] for k, h in hidden.items()}
        if gaps.any():  # a gap reset starts the recurrent state afresh (working copies: safe to zero)
            for h in h_in.values():
                h[gaps] = 0.0
        state = {k: torch.from_numpy(h).to(self.device) for k, h in h_in.items()}
        mean_n, scale_n, new = self.model.step(torch.from_numpy(feats).to(self.device), state)
        for k, h in hidden.items():
            out = new[k].cpu().numpy()
            if whole:
                h[...] = out
            else:
                h[loc] = out
        kernel.store_predictions(
            st, loc, self._offsets, mean_n.cpu().numpy(), scale_n.cpu().numpy(), centre, scale
        )
        return gaps


def _ready(model: Forecaster, device: torch.device) -> Forecaster:
    """``model`` on ``device`` in eval mode, changed only where it is not: ``Module.to`` rebuilds an
    RNN's flat weight lists even when nothing moves, and another thread's forward of the same model
    iterates them. Seen in a cluster worker: its event loop built a partition's scorer around the
    shared model while the scoring thread stepped another partition's, and that step failed
    ("zip() argument 2 is longer than argument 1" in ``_weights_have_changed``). A dry run's
    :meth:`StreamScorer.fork` builds one the same way beside the service's scoring thread."""

    def elsewhere(at: torch.device) -> bool:  # "cuda" means the current cuda device, as in Module.to
        return at.type != device.type or (device.index is not None and at.index != device.index)

    if any(elsewhere(p.device) for p in model.parameters()):
        model = model.to(device)
    if model.training:
        model.eval()
    return model


def _scatter_mask(order: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[order[mask]] = True
    return out
