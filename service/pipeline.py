"""The one path every reading takes: bounded intake queue → micro-batcher → engine → output stage.

* :class:`MicroBatcher` holds a queue bounded in *readings* (``max_queue``). ``submit`` blocks when it
  is full — for MQTT that stops reading the socket, so the broker holds the backlog (backpressure,
  never unbounded memory); REST callers get a 503 after a short wait. One worker thread takes items
  FIFO and scores them in one :meth:`Engine.apply` (a device's readings keep their order: FIFO across
  batches, timestamp order within one). A batch goes once ``min_batch`` readings are queued or the
  first has waited ``max_wait_ms`` (counted from the end of the previous step when that is later);
  it takes everything queued, up to ``max_batch``. Acks flow from the
  output stage meanwhile, so the broker keeps sending while a batch fills.
* :class:`OutputStage` releases each batch's outcomes — published results, MQTT acks, REST answers —
  in the order the batches were applied, each only once the engine says its log record is durable.
  Scoring the next batch overlaps with the disk sync of the previous one.
* Metrics are updated once per batch, before its outcomes are released (whoever sees a result and
  then reads ``/metrics`` sees it counted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sensorwatch import faults
from sensorwatch.scoring.batch import KINDS, StepResult
from sensorwatch.state.records import MessageMeta
from service.engine import Engine
from service.metrics import Metrics

log = logging.getLogger("sensorwatch.service")

#: How often the output stage notes in the log how far outputs are done (recovery republishes less).
DONE_MARK_S = 0.5

Done = Callable[[StepResult | None, int, int], None]


@dataclass(eq=False, slots=True)
class Work:
    """Readings that entered through one door together (an MQTT message, a REST request): parallel
    lists in the form they were parsed, or clean arrays (see ``ReadingBatch.from_parts``); a message
    refused whole has none and says why in ``meta``."""

    device_ids: list[str]
    ts: list[Any]
    values: list[Any]
    source: str
    done: Done
    """Called once, on the output stage, with the batch result and this work's slice of it
    (None: scoring failed)."""
    meta: MessageMeta
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.device_ids)


class QueueFull(RuntimeError):
    """The intake queue stayed full for the whole wait."""


class _Worker:
    """One daemon thread running ``_run`` over ``_items``, guarded by ``_cond``."""

    _cond: threading.Condition
    _items: deque[Any]
    _closed: bool

    def __init__(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> bool:
        """Stop taking work, finish what is queued, stop the thread. True when fully drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive() and not self._items


class MicroBatcher(_Worker):
    """Bounded FIFO of :class:`Work` and the worker thread that scores it (see module docstring)."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        outputs: OutputStage,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        min_batch: int | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.outputs = outputs
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.min_batch = min(max_batch, min_batch or max_batch)
        metrics.queue_capacity.set(max_queue)
        self._items: deque[Work] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._stepped_at = 0.0
        super().__init__("sensorwatch-batcher")

    @property
    def depth(self) -> int:
        return self._queued

    def submit(self, work: Work, timeout: float | None = None) -> None:
        """Queue ``work``; blocks while the queue is full (raises :class:`QueueFull` after ``timeout``)."""
        self.submit_many([work], timeout)

    def submit_many(self, works: list[Work], timeout: float | None = None) -> None:
        """Queue ``works`` in order (one lock hand-over for a chunk of MQTT messages); blocks while
        the queue is full, raises :class:`QueueFull` (the rest not queued) after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            for work in works:
                n = work.size
                while not self._closed and self._queued > 0 and self._queued + n > self.max_queue:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise QueueFull(f"intake queue full ({self._queued} readings waiting)")
                    self._cond.wait(left)
                if self._closed:
                    raise QueueFull("service is shutting down")
                was_empty = not self._items
                self._items.append(work)
                self._queued += n
                # Wake the worker only when it has something to decide: the first item (its wait
                # starts), or a full batch; a wake-up per message costs both threads a GIL hand-over.
                if was_empty or self._queued >= self.min_batch:
                    self._cond.notify_all()

    def _take(self) -> list[Work] | None:
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait(0.5)
            # The wait runs from the first reading's arrival or the end of the previous step,
            # whichever is later: a step has a fixed cost of several ms, so on a trickle a scorer
            # stepping back to back would spend a core on tiny batches (CPU the MQTT intake and the
            # broker need), while under load min_batch is reached first and nothing waits.
            first_at = max(self._items[0].enqueued, self._stepped_at)
            while not self._closed and self._queued < self.min_batch:
                left = first_at + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Work] = []
            n = 0
            while self._items and (not batch or n + self._items[0].size <= self.max_batch):
                w = self._items.popleft()
                batch.append(w)
                n += w.size
            self._queued -= n
            self._cond.notify_all()
        self.metrics.queue_depth.set(self._queued)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            faults.raise_point("batcher.step")
            try:
                self._score(batch)
                self._stepped_at = time.monotonic()
            except Exception:  # never let the worker die: every item must still get an outcome
                log.exception("scoring a batch failed")
                self.outputs.put(self.engine.applied_seq, lambda b=batch: _fail(b))  # type: ignore[misc]

    def _score(self, batch: list[Work]) -> None:
        parts = [(w.device_ids, w.ts, w.values) for w in batch if w.device_ids]
        seq, _, result = self.engine.apply_parts(parts, [w.meta for w in batch])
        self._count(batch, result)
        self.outputs.put(seq, lambda: _release(batch, result))

    def _count(self, batch: list[Work], result: StepResult | None) -> None:
        count_batch(self.metrics, batch, result)


def _by_source(batch: list[Work], counts: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for w, n in zip(batch, counts.tolist(), strict=True):
        if n:
            out[w.source] = out.get(w.source, 0) + n
    return out


def _release(batch: list[Work], result: StepResult | None) -> None:
    start = 0
    for w in batch:
        _safe(w.done, result, start, start + w.size)
        start += w.size


def _fail(batch: list[Work]) -> None:
    for w in batch:
        _safe(w.done, None, 0, 0)


class OutputStage(_Worker):
    """Runs each batch's release in apply order, once the engine's log is durable up to its record."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        engine.release_tracked = True
        self._items: deque[tuple[int, Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.failed: str | None = None
        self.done_seq = 0
        self._marked_seq = 0
        self._marked_at = time.monotonic()
        #: Called after a batch's release; the service counts a release delivered only once the
        #: broker acknowledged what it published (the default: released is delivered).
        self.on_released: Callable[[int], None] = engine.mark_released
        super().__init__("sensorwatch-outputs")

    @property
    def depth(self) -> int:
        return len(self._items)

    def put(self, seq: int, release: Callable[[], None]) -> None:
        with self._cond:
            self._items.append((seq, release))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait(DONE_MARK_S)
                    self._mark()
                if not self._items:
                    return
                seq, release = self._items[0]
            while not self.engine.wait_durable(seq, 1.0):
                wal = self.engine.wal
                if wal is not None and wal.failed is not None:
                    # Nothing more can be made durable: no outcome is released, no message acked (the
                    # broker redelivers them after a restart); the service reports itself unready.
                    self.failed = f"write-ahead log failed: {wal.failed}"
                    log.error("%s; outputs stopped at record %d", self.failed, self.done_seq)
                    return
            _safe(release)
            with self._cond:
                self._items.popleft()
            self.done_seq = seq
            self.on_released(seq)
            self._mark()

    def _mark(self) -> None:
        now = time.monotonic()
        released = self.engine.released
        if now - self._marked_at >= DONE_MARK_S and released > self._marked_seq:
            self._marked_at, self._marked_seq = now, released
            self.engine.log_done(released)


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("result callback failed")


def count_batch(m: Metrics, batch: list[Work], result: StepResult | None) -> None:
    """All metrics of one scored batch, in a handful of vectorised updates."""
    sizes = np.fromiter((w.size for w in batch), dtype=np.int64, count=len(batch))
    total = int(sizes.sum())
    if result is None:
        for source, n in _by_source(batch, sizes).items():
            m.readings.labels(source, "rejected").inc(n)
        m.rejections.labels("internal_error").inc(total)
        return
    m.batch_size.observe(total)
    acc = result.accepted
    starts = np.cumsum(sizes) - sizes
    scored = np.add.reduceat(acc, starts[sizes > 0]) if total else np.zeros(0, dtype=np.int64)
    per_work = np.zeros(len(batch), dtype=np.int64)
    per_work[sizes > 0] = scored
    for source, n in _by_source(batch, per_work).items():
        m.readings.labels(source, "scored").inc(n)
    for source, n in _by_source(batch, sizes - per_work).items():
        m.readings.labels(source, "rejected").inc(n)
    now = time.monotonic()
    waited = np.fromiter((now - w.enqueued for w in batch), dtype=np.float64, count=len(batch))
    m.latency.observe_many(np.repeat(waited, per_work))
    if not acc.all():
        for reason, n in Counter(result.reason[~acc].tolist()).items():
            m.rejections.labels(reason).inc(n)
    m.anomalies.inc(int(result.is_anomaly.sum()))
    events = np.bincount(result.kind[result.starts_event], minlength=len(KINDS))
    for code in np.flatnonzero(events[1:]) + 1:
        m.anomaly_events.labels(KINDS[code]).inc(int(events[code]))
    m.gap_resets.inc(int(result.gap_reset.sum()))
    m.likelihood.observe_many(result.likelihood[acc])
