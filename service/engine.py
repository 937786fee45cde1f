"""The engine: the scorer, its model and its state behind one lock — and their durability.

Every state change (a micro-batch, a device reset, a model swap) is applied under the lock and, when
the write-ahead log is on (``WAL_SYNC`` fsync or none), appended to the log *before* it is applied, in
the same order. Outputs of a change are released only once its record is durable (the pipeline's
output stage waits for :attr:`durable`). See :meth:`Engine.snapshot` and :meth:`Engine.recover` for the
two other halves of the protocol.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sensorwatch import faults
from sensorwatch.artifacts import (
    BUILTIN_NAME,
    DEFAULT_MODEL,
    ArtifactError,
    load_default_or_builtin,
    load_model,
    resolve,
)
from sensorwatch.model.forecaster import BUILTIN_VERSION
from sensorwatch.scoring import kernel
from sensorwatch.scoring.batch import Part, Reading, ReadingBatch, StepResult
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.state import records as rec
from sensorwatch.state.store import DeviceStateStore, StateIncompatibleError
from sensorwatch.state.wal import WalCorruptError, WriteAheadLog
from service.metrics import Metrics
from service.settings import Settings, scorer_config

log = logging.getLogger("sensorwatch.service")

SNAPSHOT_NAME = "state.safetensors"
WAL_DIR = "wal"
#: Digests of the most recent messages kept for recognising redeliveries after a crash. The broker has
#: at most RECEIVE_MAXIMUM (1,000) messages unacked to us, all among the most recent ones we applied.
REDELIVERY_WINDOW = 10_000


class RecoveryError(RuntimeError):
    """The state cannot be recovered exactly (the service refuses to start)."""


@dataclass
class Replayed:
    """A batch applied again during recovery whose outputs may not have been published."""

    seq: int
    record: rec.BatchRecord
    result: StepResult | None


@dataclass
class Recovery:
    restored_devices: int = 0
    snapshot_seq: int = 0
    replayed_records: int = 0
    replayed_readings: int = 0
    unpublished: list[Replayed] = field(default_factory=list)
    released_through: int = 0  # every outcome up to this record was released before the crash
    seconds: float = 0.0


class Engine:
    """The scorer, its model and its state, behind one lock (see module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lock = threading.RLock()
        self._threads_set = threading.local()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
            kernel.set_threads(settings.torch_threads)  # the scoring kernel's threads too
        # The default name falls back to the documented built-in model when no artifact is shipped.
        ref = None if settings.model == DEFAULT_MODEL else settings.model
        model, version = load_default_or_builtin(ref, settings.models_dir, channels=1)
        log.info("serving model %s", version)
        self.model_name, self.model_ref = split_ref(version)
        self.sha256 = _sha_of(version, settings.models_dir)
        self.configured = version
        cfg = scorer_config(settings)
        # The store's clock (idle TTL) is the wall clock of the batch, recorded in its log record so a
        # replay folds exactly the same.
        self._now = time.time()
        self.scorer = StreamScorer(model, cfg, model_version=version, clock=lambda: self._now)
        # Load the compiled scoring kernels now (~0.5 s from numba's cache), not on the first readings.
        kernel.warm([(model, cfg)])
        metrics.set_model(self.model_name, self.model_ref)
        metrics.max_devices.set(self.scorer.store.max_devices)
        self._evictions_seen = 0
        self.applied_seq = 0  # last record applied to the state
        self.recent: deque[bytes] = deque(maxlen=REDELIVERY_WINDOW)  # digests of messages applied
        self.wal: WriteAheadLog | None = None
        if settings.state_dir is not None and settings.wal_sync != "off":
            self.wal = WriteAheadLog(settings.state_dir / WAL_DIR, sync=settings.wal_sync)
        self._snapshot_lock = threading.Lock()
        self._wal_bytes_at_snapshot = 0
        self.snapshot_wanted = threading.Event()
        self.release_tracked = False  # an output stage calls mark_released (the service)
        self.on_plain_record: Callable[[int], None] | None = None
        self._released = 0
        self._released_cond = threading.Condition()

    # ------------------------------------------------------------------ the log
    def _log(self, record: rec.Record) -> int:
        """Append under the lock, before the change is applied (so the log's order is the apply order)."""
        seq = self.applied_seq + 1 if self.wal is None else self.wal.append(rec.encode(record))
        if not isinstance(record, rec.BatchRecord) and self.on_plain_record is not None:
            self.on_plain_record(seq)  # a record with no outcomes of its own: released in its turn
        if self.wal is not None:
            grown = self.wal.bytes_written - self._wal_bytes_at_snapshot
            if grown > self.settings.wal_snapshot_mb * (1 << 20):
                self.snapshot_wanted.set()
        return seq

    @property
    def durable(self) -> int:
        """Every record up to this seq is durable (as ``WAL_SYNC`` defines it)."""
        return self.applied_seq if self.wal is None else self.wal.durable

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        return True if self.wal is None else self.wal.wait_durable(seq, timeout)

    @property
    def released(self) -> int:
        """Every outcome up to this record is released (and delivered to the broker)."""
        return self._released

    def mark_released(self, seq: int) -> None:
        """Every outcome up to ``seq`` is released (published and acknowledged, answered, acked)."""
        with self._released_cond:
            self._released = max(self._released, seq)
            self._released_cond.notify_all()

    def wait_released(self, seq: int, timeout: float) -> bool:
        if not self.release_tracked:  # no output stage (the library use, tests): durable is released
            return self.wait_durable(seq, timeout)
        deadline = time.monotonic() + timeout
        with self._released_cond:
            while self._released < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._released_cond.wait(left)
        return True

    def log_done(self, through: int) -> None:
        """Outputs published and messages acked up to ``through`` (recovery republishes only later ones)."""
        if self.wal is not None and self.wal.failed is None:
            self.wal.append(rec.encode(rec.DoneRecord(through)))

    # ------------------------------------------------------------------ scoring
    def apply(
        self,
        device_ids: list[str],
        ts: Sequence[Any],
        values: Sequence[Any],
        messages: list[rec.MessageMeta],
    ) -> tuple[int, ReadingBatch, StepResult | None]:
        """Build the micro-batch, log it, score it; ``None`` as result when the scorer step failed."""
        return self.apply_parts([(device_ids, ts, values)], messages)

    def apply_parts(
        self, parts: Sequence[Part], messages: list[rec.MessageMeta]
    ) -> tuple[int, ReadingBatch, StepResult | None]:
        """:meth:`apply` of readings given in parts (one per message or request, as lists or clean
        arrays: ``ReadingBatch.from_parts``), built under the lock: a model swap changes the channels."""
        with self.lock:
            self._own_threads()
            batch = ReadingBatch.from_parts(parts, self.scorer.channel_names)
            if not len(batch):  # only messages refused whole: no state change, nothing to log
                return self.applied_seq, batch, self.scorer.step(batch)
            self._now = time.time()
            seq = self._log(rec.BatchRecord(self._now, batch, messages))
            result = self._step(batch)
            self.applied_seq = seq
            self.recent.extend(m.digest for m in messages if m.digest)
        return seq, batch, result

    def _own_threads(self) -> None:
        """Apply ``TORCH_THREADS`` to the calling thread, once per thread: torch's OpenMP thread
        count is a per-thread setting, so the micro-batcher's steps ran on a team of every core
        although the engine had set one. Measured: its extra OpenMP worker spun in
        ``gomp_barrier_wait_end`` between steps, ~95 % of a core at 1,000 live readings/s."""
        n = self.settings.torch_threads
        if n and not getattr(self._threads_set, "done", False):
            torch.set_num_threads(n)
            self._threads_set.done = True

    def _step(self, batch: ReadingBatch) -> StepResult | None:
        try:
            result = self.scorer.step(batch)
        except Exception:  # every reading still gets an outcome (internal_error); replay does the same
            log.exception("scoring a batch failed")
            return None
        ev = sum(self.scorer.store.evictions.values())
        if ev > self._evictions_seen:
            self.metrics.evictions.inc(ev - self._evictions_seen)
        self._evictions_seen = ev
        self.metrics.active_devices.set(len(self.scorer.store))
        return result

    def dry_run(self, readings: Sequence[Reading]) -> StepResult:
        """Score against copies of the devices' state; nothing is advanced (and nothing logged)."""
        with self.lock:
            self._now = time.time()  # the clock the far-future check compares with (nothing is logged)
            scratch = self.scorer.fork([r.device_id for r in readings if isinstance(r.device_id, str)])
        return scratch.step(list(readings))

    def reset(self, device_id: str) -> tuple[bool, int]:
        """Forget a device (logged); returns whether it was known and the record's seq."""
        with self.lock:
            if device_id not in self.scorer.store:
                return False, self.applied_seq
            seq = self._log(rec.ResetRecord(device_id))
            self.scorer.reset(device_id)
            self.applied_seq = seq
            self.metrics.active_devices.set(len(self.scorer.store))
        return True, seq

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
        """Validate and load ``ref`` outside the lock, then swap between batches (logged)."""
        try:
            loaded = load_model(ref, self.settings.models_dir)
        except ArtifactError:
            self.metrics.model_reloads.labels("failure").inc()
            raise
        old = self.describe()
        with self.lock:
            seq = self._log(rec.ReloadRecord(loaded.ref, loaded.sha256))
            kept = self.scorer.swap_model(loaded.model, loaded.ref)
            self.applied_seq = seq
            self.model_name, self.model_ref, self.sha256 = loaded.name, loaded.version, loaded.sha256
            self.metrics.active_devices.set(len(self.scorer.store))  # 0 after a reset
        self.wait_durable(seq, 30.0)
        self.metrics.model_reloads.labels("success").inc()
        self.metrics.set_model(loaded.name, loaded.version)
        return {"old": old, "new": self.describe(), "state": "kept" if kept else "reset"}

    # ------------------------------------------------------------------ snapshots
    def snapshot_path(self) -> Path | None:
        d = self.settings.state_dir
        return None if d is None else d / SNAPSHOT_NAME

    def snapshot(self) -> Path | None:
        """Snapshot protocol (one at a time):

        1. Under the lock, copy every device's state and note the last record it includes (``seq``)
           and the digests of the most recent messages: a copy, so scoring goes on while it is written.
        2. Outside the lock, write the copy to a temporary file and fsync it.
        3. Before the rename, wait until the outcomes of every record up to ``seq`` are released
           (durable in the log, then published, answered, acked): a snapshot must never be ahead of
           them — the log behind it is deleted next, and a record whose outcomes were never published
           could then not be replayed to publish them (its redelivered messages would only be acked).
        4. Rename over the old snapshot and fsync the directory: from here recovery starts at ``seq``.
        5. Only now delete the log segments whose records are all ``<= seq`` (the old snapshot plus
           them was the only other way to that state).
        """
        path = self.snapshot_path()
        if path is None:
            return None
        with self._snapshot_lock:
            with self.lock:  # 1.
                seq = self.applied_seq
                copy = self.scorer.capture({"wal_seq": seq, "recent": [d.hex() for d in self.recent]})
                if self.wal is not None:
                    self._wal_bytes_at_snapshot = self.wal.bytes_written
                self.snapshot_wanted.clear()

            def before_rename() -> None:  # 3.
                if not self.wait_released(seq, 60.0):
                    raise RuntimeError(f"outcomes not released up to record {seq}; snapshot not taken")
                faults.point("snapshot.before_rename")

            copy.write(path, before_rename)  # 2., 4.
            faults.point("snapshot.after_rename")
            if self.wal is not None:  # 5.
                self.wal.drop_through(seq)
        self.metrics.snapshots.inc()
        return path

    # ------------------------------------------------------------------ recovery
    def recover(self) -> Recovery:
        """Recovery protocol, before any door opens:

        1. Load the snapshot (when there is one that fits the model; one that does not is moved aside
           with the log, as their records belong to another state layout): state as of record ``S``.
        2. Read the log after ``S``: a torn last record (a kill during a write) is cut off with a log
           line; a corrupt record in the middle or a gap refuses to start (:class:`RecoveryError`),
           never skipping a state change.
        3. Apply every record again in order, with the model and the clock it was first applied with.
        4. Remember the digests of the messages applied but possibly not acked (the recent window
           of the snapshot and every replayed batch): a redelivered one is acked, not scored twice.
        5. Keep the batches after the last "outputs done" mark: their outputs are published again,
           marked ``replayed`` (consumers dedupe by ``event_id``).
        6. Serve the configured model from here on (a reload before the crash lasted until restart).
        """
        out = Recovery()
        started = time.monotonic()
        extra = self._restore(out)  # 1.
        recent = [bytes.fromhex(d) for d in extra.get("recent", [])]
        self.recent.extend(recent)
        out.released_through = self.applied_seq
        if self.wal is not None:
            self._replay(out)  # 2.-5.
            self.wal.start()
        if self.scorer.model_version != self.configured:  # 6.
            log.info(
                "recovered with %s; switching to the configured %s",
                self.scorer.model_version,
                self.configured,
            )
            self._swap_to(self.configured)
        out.seconds = time.monotonic() - started
        return out

    def redelivery_digests(self) -> set[bytes]:
        return set(self.recent)

    def _restore(self, out: Recovery) -> dict[str, Any]:
        path = self.snapshot_path()
        if path is None or not path.is_file():
            return {}
        try:
            extra = self.scorer.restore(str(path))
        except StateIncompatibleError as exc:
            stamp = int(time.time())
            aside = path.with_suffix(f".incompatible-{stamp}")
            path.rename(aside)
            wal_dir = path.parent / WAL_DIR
            if wal_dir.is_dir():
                shutil.move(str(wal_dir), str(path.parent / f"{WAL_DIR}.incompatible-{stamp}"))
            log.warning(
                "state snapshot not restored (%s); moved to %s with its log, starting fresh", exc, aside
            )
            return {}
        out.restored_devices = len(self.scorer.store)
        out.snapshot_seq = self.applied_seq = int(extra.get("wal_seq", 0))
        snap_model = str(extra.get("model_version", self.scorer.model_version))
        if snap_model != self.scorer.model_version:
            self._swap_to(snap_model, log_it=False)  # replay with the model the state was built with
        self.metrics.active_devices.set(out.restored_devices)
        return extra

    def _replay(self, out: Recovery) -> None:
        assert self.wal is not None
        pending: list[Replayed] = []
        try:
            for seq, payload in self.wal.open(after=self.applied_seq):
                record = rec.decode(payload)
                if isinstance(record, rec.BatchRecord):
                    self._now = record.clock
                    result = self._step(record.batch)
                    self.recent.extend(m.digest for m in record.messages if m.digest)
                    pending.append(Replayed(seq, record, result))
                    out.replayed_readings += len(record.batch)
                elif isinstance(record, rec.ResetRecord):
                    self.scorer.reset(record.device_id)
                elif isinstance(record, rec.ReloadRecord):
                    self._swap_to(record.ref, log_it=False)
                else:
                    pending = [p for p in pending if p.seq > record.through]
                self.applied_seq = seq
                out.replayed_records += 1
                faults.point("replay.record")
        except (ValueError, KeyError) as exc:  # a record that passed its CRC but does not decode
            raise RecoveryError(
                f"write-ahead log record after {self.applied_seq}: unreadable ({exc})"
            ) from exc
        except RuntimeError as exc:
            raise RecoveryError(str(exc)) from exc
        out.unpublished = pending
        out.released_through = pending[0].seq - 1 if pending else self.applied_seq

    def _swap_to(self, ref: str, *, log_it: bool = True) -> None:
        if ref == BUILTIN_VERSION:
            model, sha = load_default_or_builtin(BUILTIN_NAME, self.settings.models_dir, channels=1)[0], None
        else:
            try:
                loaded = load_model(ref, self.settings.models_dir)
            except ArtifactError as exc:
                log.warning("model %s not loadable (%s); keeping %s", ref, exc, self.scorer.model_version)
                return
            model, sha = loaded.model, loaded.sha256
        with self.lock:
            if log_it:
                self.applied_seq = self._log(rec.ReloadRecord(ref, sha))
            self.scorer.swap_model(model, ref)
            self.model_name, self.model_ref = split_ref(ref)
            self.sha256 = sha
        self.metrics.set_model(self.model_name, self.model_ref)

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()


def check_state(settings: Settings) -> None:
    """Refuse to start (:class:`RecoveryError`, one line naming the file and offset) when the log
    cannot be replayed — checked before the server starts, so the refusal is not a traceback."""
    if settings.state_dir is None or settings.wal_sync == "off":
        return
    wal_dir = settings.state_dir / WAL_DIR
    if not wal_dir.is_dir():
        return
    after = 0
    snapshot = settings.state_dir / SNAPSHOT_NAME
    if snapshot.is_file():
        try:
            _, metadata = DeviceStateStore.read_snapshot(snapshot)
            after = int(json.loads(metadata.get("extra", "{}")).get("wal_seq", 0))
        except (StateIncompatibleError, ValueError):
            return  # recover() moves an unusable snapshot aside together with its log
    try:
        for _ in WriteAheadLog(wal_dir).open(after=after):
            pass
    except (WalCorruptError, OSError) as exc:
        raise RecoveryError(str(exc)) from None


def split_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition("/")
    return name, version or "0"


def _sha_of(ref: str, models_dir: Path) -> str | None:
    """The weights' sha256 from the card (already verified when the model was loaded)."""
    if ref == BUILTIN_VERSION:
        return None  # the built-in fallback has no artifact
    card = json.loads((resolve(ref, models_dir) / "card.json").read_text())
    return str(card["sha256"])
