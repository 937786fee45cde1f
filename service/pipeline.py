"""The one path every reading takes: bounded intake queue → micro-batcher → scorer → fan-out.

* :class:`Engine` owns the :class:`~sensorwatch.StreamScorer` and a lock: a scorer step, a model swap,
  a device reset and a snapshot never overlap (swaps happen *between* batches).
* :class:`MicroBatcher` holds a queue bounded in *readings* (``max_queue``). ``submit`` blocks when it
  is full — for MQTT that stops reading the socket, so the broker holds the backlog (backpressure,
  never unbounded memory); REST callers get a 503 after a short wait. One worker thread takes items
  FIFO until ``max_batch`` readings or ``max_wait_ms`` have passed, scores them in one
  ``StreamScorer.step`` (a device's readings keep their order: FIFO across batches, timestamp order
  within one), then calls each item's ``done`` with its slice of the result.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorwatch.artifacts import DEFAULT_MODEL, ArtifactError, load_default_or_builtin, load_model, resolve
from sensorwatch.model.forecaster import BUILTIN_VERSION
from sensorwatch.scoring.batch import Reading, StepResult
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.state.store import StateIncompatibleError
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("sensorwatch.service")

SNAPSHOT_NAME = "state.safetensors"


@dataclass
class Work:
    """Readings that entered through one door together (an MQTT message, a REST request)."""

    readings: list[Reading]
    source: str
    done: Callable[[StepResult | None, int, int], None]
    """Called once with the batch result and this work's slice of it (None: scoring failed)."""
    enqueued: float = field(default_factory=time.monotonic)


class Engine:
    """The scorer, its model and its state, behind one lock."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lock = threading.RLock()
        # The default name falls back to the documented built-in model when no artifact is shipped.
        ref = None if settings.model == DEFAULT_MODEL else settings.model
        model, version = load_default_or_builtin(ref, settings.models_dir, channels=1)
        log.info("serving model %s", version)
        self.model_name, self.model_ref = _split_ref(version)
        self.sha256 = _sha_of(version, settings.models_dir)
        cfg = ScorerConfig(
            calibrator=settings.calibrator,
            likelihood_threshold=settings.likelihood_threshold,
            seasonal_check=settings.seasonal_check,
            point_likelihood=settings.point_likelihood,
            max_devices=settings.max_devices,
            device_ttl_s=settings.device_ttl_s,
        )
        self.scorer = StreamScorer(model, cfg, model_version=version)
        metrics.set_model(self.model_name, self.model_ref)
        metrics.max_devices.set(self.scorer.store.max_devices)
        self._evictions_seen = 0

    # ------------------------------------------------------------------ scoring
    def step(self, readings: Sequence[Reading]) -> StepResult:
        with self.lock:
            result = self.scorer.step(list(readings))
            ev = sum(self.scorer.store.evictions.values())
            if ev > self._evictions_seen:
                self.metrics.evictions.inc(ev - self._evictions_seen)
            self._evictions_seen = ev
            self.metrics.active_devices.set(len(self.scorer.store))
        return result

    def dry_run(self, readings: Sequence[Reading]) -> StepResult:
        """Score against copies of the devices' state; nothing is advanced."""
        with self.lock:
            scratch = self.scorer.fork([r.device_id for r in readings if isinstance(r.device_id, str)])
        return scratch.step(list(readings))

    # ------------------------------------------------------------------ model
    def describe(self) -> dict[str, Any]:
        cfg = self.scorer.model.config
        return {
            "name": self.model_name,
            "version": self.model_ref,
            "ref": self.scorer.model_version,
            "cell": cfg.cell,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "channels": list(cfg.names),
            "sha256": self.sha256,
        }

    def reload(self, ref: str) -> dict[str, Any]:
        """Validate and load ``ref`` outside the lock, then swap between batches."""
        try:
            loaded = load_model(ref, self.settings.models_dir)
        except ArtifactError:
            self.metrics.model_reloads.labels("failure").inc()
            raise
        old = self.describe()
        with self.lock:
            kept = self.scorer.swap_model(loaded.model, loaded.ref)
            self.model_name, self.model_ref, self.sha256 = loaded.name, loaded.version, loaded.sha256
            self.metrics.active_devices.set(len(self.scorer.store))  # 0 after a reset
        self.metrics.model_reloads.labels("success").inc()
        self.metrics.set_model(loaded.name, loaded.version)
        return {"old": old, "new": self.describe(), "state": "kept" if kept else "reset"}

    # ------------------------------------------------------------------ state
    def snapshot_path(self) -> Path | None:
        d = self.settings.state_dir
        return None if d is None else d / SNAPSHOT_NAME

    def snapshot(self) -> Path | None:
        path = self.snapshot_path()
        if path is None:
            return None
        with self.lock:
            self.scorer.snapshot(str(path))
        self.metrics.snapshots.inc()
        return path

    def restore(self) -> int:
        """Restore the snapshot when one exists and fits the model; returns devices restored."""
        path = self.snapshot_path()
        if path is None or not path.is_file():
            return 0
        with self.lock:
            try:
                self.scorer.restore(str(path))
            except StateIncompatibleError as exc:
                aside = path.with_suffix(f".incompatible-{int(time.time())}")
                path.rename(aside)
                log.warning("state snapshot not restored (%s); moved to %s, starting fresh", exc, aside)
                return 0
            n = len(self.scorer.store)
        self.metrics.active_devices.set(n)
        return n


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("/")
    return name, version or "0"


def _sha_of(ref: str, models_dir: Path) -> str | None:
    """The weights' sha256 from the card (already verified when the model was loaded)."""
    if ref == BUILTIN_VERSION:
        return None  # the built-in fallback has no artifact
    card = json.loads((resolve(ref, models_dir) / "card.json").read_text())
    return str(card["sha256"])


class QueueFull(RuntimeError):
    """The intake queue stayed full for the whole wait."""


class MicroBatcher:
    """Bounded FIFO of :class:`Work` and the worker thread that scores it (see module docstring)."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_result: Callable[[Work, StepResult, int, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        metrics.queue_capacity.set(max_queue)
        self.on_result = on_result
        self._items: deque[Work] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sensorwatch-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queued

    def submit(self, work: Work, timeout: float | None = None) -> None:
        """Queue ``work``; blocks while the queue is full (raises :class:`QueueFull` after ``timeout``)."""
        n = len(work.readings)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and self._queued > 0 and self._queued + n > self.max_queue:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise QueueFull(f"intake queue full ({self._queued} readings waiting)")
                self._cond.wait(left)
            if self._closed:
                raise QueueFull("service is shutting down")
            self._items.append(work)
            self._queued += n
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> bool:
        """Stop intake, score everything already queued, stop the worker. True when fully drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive() and not self._items

    def _take(self) -> list[Work] | None:
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait(0.5)
            first_at = self._items[0].enqueued
            while not self._closed and self._queued < self.max_batch:
                left = first_at + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Work] = []
            n = 0
            while self._items and (not batch or n + len(self._items[0].readings) <= self.max_batch):
                w = self._items.popleft()
                batch.append(w)
                n += len(w.readings)
            self._queued -= n
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify_all()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._score(batch)
            except Exception:  # never let the worker die: every item must still get an outcome
                log.exception("scoring a batch failed")
                for w in batch:
                    self.metrics.readings.labels(w.source, "rejected").inc(len(w.readings))
                    self.metrics.rejections.labels("internal_error").inc(len(w.readings))
                    _safe(w.done, None, 0, 0)

    def _score(self, batch: list[Work]) -> None:
        readings = [r for w in batch for r in w.readings]
        result = self.engine.step(readings)
        now = time.monotonic()
        m = self.metrics
        m.batch_size.observe(len(readings))
        slices = []
        start = 0
        for w in batch:
            stop = start + len(w.readings)
            acc = result.accepted[start:stop]
            scored = int(acc.sum())
            m.readings.labels(w.source, "scored").inc(scored)
            m.readings.labels(w.source, "rejected").inc(acc.size - scored)
            m.latency.observe_many(np.full(scored, now - w.enqueued))  # scored readings only
            slices.append((w, start, stop))
            start = stop
        for reason in result.reason[~result.accepted].tolist():
            m.rejections.labels(reason).inc()
        m.anomalies.inc(int(result.is_anomaly.sum()))
        m.gap_resets.inc(int(result.gap_reset.sum()))
        m.likelihood.observe_many(result.likelihood[result.accepted])
        # Metrics first: whoever gets a result (a REST caller, an MQTT subscriber) and then reads
        # /metrics sees it counted.
        for w, start, stop in slices:
            if self.on_result is not None:
                _safe(self.on_result, w, result, start, stop)
            _safe(w.done, result, start, stop)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("result callback failed")
