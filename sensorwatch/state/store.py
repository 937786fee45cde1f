"""Per-device state as rows of preallocated tensors.

A device's state is data: one row in each of a few named tensors (hidden state, normaliser and
calibration statistics, …) plus its id. Rows are allocated from a free list, the tensors grow in
chunks up to ``max_devices``, and a device's row is given back when it is evicted (least recently
used when the store is full, or idle for longer than ``ttl_s``) or reset.

Snapshots are immutable copies written atomically as safetensors (weights only, never pickle) and
stamped with an identity (the model architecture and the column layout): restoring a snapshot into a
store with another identity is a :class:`StateIncompatibleError`.

>>> import torch
>>> from sensorwatch.state.store import ColumnSpec, DeviceStateStore
>>> store = DeviceStateStore({"h": ColumnSpec((4,), torch.float32)}, max_devices=2, chunk=2)
>>> rows = store.rows_for(["a", "b"])
>>> store.columns["h"][rows] = 1.0
>>> _ = store.rows_for(["c"])       # full: "a" (least recently used) is evicted
>>> sorted(store.device_ids()), store.evictions
(['b', 'c'], {'lru': 1, 'ttl': 0})
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, load_file, save, save_file

SNAPSHOT_FORMAT = "sensorwatch-state/1"
LAST_SEEN = "_store.last_seen"


class StateIncompatibleError(ValueError):
    """A snapshot does not belong to this store's model/layout (or is not a sensorwatch snapshot)."""


class CapacityError(RuntimeError):
    """More distinct devices were asked for at once than ``max_devices`` allows."""


@dataclass(frozen=True)
class ColumnSpec:
    """One per-device tensor column: per-row ``shape``, ``dtype`` and the value of a fresh row
    (``fill`` everywhere, or the row ``template`` of a packed column, whose layout the owner
    describes in the store's identity)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float = 0.0
    template: np.ndarray | None = field(default=None, compare=False, repr=False)

    def fresh(self) -> torch.Tensor | float:
        """What a fresh row holds (broadcast over the row)."""
        return self.fill if self.template is None else torch.from_numpy(self.template).to(self.dtype)

    def allocate(self, rows: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``rows`` fresh rows of this column."""
        t = torch.full((rows, *self.shape), self.fill, dtype=self.dtype, device=device)
        if self.template is not None:
            t[:] = self.fresh()
        return t

    def describe(self) -> list[Any]:
        # Non-finite fills as strings: NaN != NaN would make a JSON round trip never compare equal.
        fill: float | str = self.fill if math.isfinite(self.fill) else str(self.fill)
        if self.template is not None:
            fill = "template"
        return [list(self.shape), str(self.dtype).removeprefix("torch."), fill]


@dataclass(frozen=True)
class StateCopy:
    """A captured copy of a store's state, ready to be written (:meth:`DeviceStateStore.capture`)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def to_bytes(self) -> bytes:
        """The copy as one safetensors document (the same bytes :meth:`write` puts in a file): what a
        cluster checkpoint stores."""
        return save(self.tensors, metadata=self.metadata)

    def write(self, path: str | os.PathLike[str], before_rename: Callable[[], None] | None = None) -> Path:
        """Write atomically:

        1. to a temporary file in the target directory, fsynced: a crash leaves either the old
           snapshot or the new one, never a torn file;
        2. ``before_rename()`` (the caller's last word: the service waits for the write-ahead log to
           be durable up to the snapshot's sequence, so a snapshot is never ahead of the log);
        3. ``os.replace`` onto ``path`` (atomic on POSIX) and fsync the directory so the rename survives.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(self.tensors, tmp, metadata=self.metadata)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path


class DeviceStateStore:
    """Bounded map from device id to a row of state tensors (see module docstring)."""

    def __init__(
        self,
        columns: dict[str, ColumnSpec],
        *,
        max_devices: int = 100_000,
        ttl_s: float | None = None,
        chunk: int = 1024,
        identity: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_devices < 1 or chunk < 1:
            raise ValueError("max_devices and chunk must be >= 1")
        self.specs = dict(columns)
        self.max_devices = max_devices
        self.ttl_s = ttl_s
        self.chunk = chunk
        self.clock = clock
        self.device = torch.device(device)
        self.identity = {"columns": {k: s.describe() for k, s in self.specs.items()}, **(identity or {})}
        self.evictions = {"lru": 0, "ttl": 0}
        self.capacity = 0
        self.columns: dict[str, torch.Tensor] = {}
        self._index: dict[str, int] = {}
        self._row_ids: list[str | None] = []
        self._free: list[int] = []
        self._last_used = np.zeros(0, dtype=np.int64)  # LRU tick per row (0 = free)
        self._last_seen = np.zeros(0, dtype=np.float64)  # clock() at last use, for the idle TTL
        self._tick = 0
        self._grow(min(chunk, max_devices))

    # ------------------------------------------------------------------ size and lookup
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._index

    def device_ids(self) -> list[str]:
        return list(self._index)

    def row_of(self, device_id: str) -> int | None:
        return self._index.get(device_id)

    def lookup(self, device_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``device_ids`` (-1 for unknown ones), without creating or touching anything."""
        return np.fromiter(
            map(self._index.get, device_ids, itertools.repeat(-1)), dtype=np.int64, count=len(device_ids)
        )

    def rows_for(self, device_ids: Sequence[str], protect: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``device_ids`` (distinct ids), allocating rows for new devices and marking all as used.

        Rows in ``protect`` are never evicted to make room (the rest of the current batch).
        """
        unknown = [d for d in dict.fromkeys(device_ids) if d not in self._index]
        if unknown:
            known_rows = self.lookup([d for d in device_ids if d in self._index])
            keep = known_rows if protect is None else np.concatenate([known_rows, protect])
            self._allocate(unknown, keep)
        rows = np.fromiter(map(self._index.__getitem__, device_ids), dtype=np.int64, count=len(device_ids))
        self.touch(rows)
        return rows

    def touch(self, rows: np.ndarray) -> None:
        self._tick += 1
        self._last_used[rows] = self._tick
        self._last_seen[rows] = self.clock()

    # ------------------------------------------------------------------ lifetime
    def reset(self, device_id: str) -> bool:
        """Forget a device (its next reading starts from a fresh state). True if it was known."""
        row = self._index.get(device_id)
        if row is None:
            return False
        self._release(np.array([row]))
        return True

    def expire(self, now: float | None = None) -> int:
        """Evict devices idle for longer than ``ttl_s``; returns how many."""
        if self.ttl_s is None or not self._index:
            return 0
        now = self.clock() if now is None else now
        idle = np.flatnonzero((self._last_used > 0) & (now - self._last_seen > self.ttl_s))
        if idle.size:
            self._release(idle)
            self.evictions["ttl"] += int(idle.size)
        return int(idle.size)

    def _allocate(self, new_ids: list[str], keep: np.ndarray) -> None:
        need = len(new_ids)
        if need > self.max_devices - keep.size:
            raise CapacityError(
                f"{need} new devices do not fit beside {keep.size} active (max {self.max_devices})"
            )
        if need > len(self._free) and self.capacity < self.max_devices:
            self._grow(min(self.max_devices, max(self.capacity * 2, len(self) + need)))
        short = need - len(self._free)
        if short > 0:
            self._evict_lru(short, keep)
        rows = [self._free.pop() for _ in range(need)]
        for device_id, row in zip(new_ids, rows, strict=True):
            self._index[device_id] = row
            self._row_ids[row] = device_id
        self._init_rows(np.array(rows, dtype=np.int64))

    def _evict_lru(self, count: int, keep: np.ndarray) -> None:
        ticks = self._last_used.copy()
        ticks[ticks == 0] = np.iinfo(np.int64).max  # free rows are not candidates
        ticks[keep] = np.iinfo(np.int64).max
        victims = np.argpartition(ticks, count - 1)[:count]
        self._release(victims)
        self.evictions["lru"] += count

    def _release(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            device_id = self._row_ids[row]
            if device_id is not None:
                del self._index[device_id]
                self._row_ids[row] = None
                self._free.append(row)
        self._last_used[rows] = 0
        self._init_rows(rows)

    def _init_rows(self, rows: np.ndarray) -> None:
        idx = torch.from_numpy(rows).to(self.device)
        for name, spec in self.specs.items():
            self.columns[name][idx] = spec.fresh()

    def _grow(self, new_capacity: int) -> None:
        old = self.capacity
        if new_capacity <= old:
            return
        for name, spec in self.specs.items():
            t = spec.allocate(new_capacity, self.device)
            if old:
                t[:old] = self.columns[name]
            self.columns[name] = t
        self._row_ids.extend([None] * (new_capacity - old))
        # Pop from the end: lowest free row first keeps the used rows compact.
        self._free = list(range(new_capacity - 1, old - 1, -1)) + self._free
        self._last_used = np.concatenate([self._last_used, np.zeros(new_capacity - old, dtype=np.int64)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(new_capacity - old)])
        self.capacity = new_capacity

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write an immutable copy of every device's state to ``path`` atomically."""
        return self.capture(extra).write(path)

    def capture(self, extra: dict[str, Any] | None = None) -> StateCopy:
        """An immutable copy of every device's state (cheap; take it under the caller's lock and
        write it outside: :meth:`StateCopy.write`).

        The occupied rows are copied compacted, in LRU order, into fresh tensors, so the copy never
        aliases live state; the idle clock of each device travels with it (``_store.last_seen``).
        """
        ids = list(self._index)
        rows = np.array([self._index[d] for d in ids], dtype=np.int64)
        order = np.argsort(self._last_used[rows], kind="stable")
        ids = [ids[i] for i in order]
        idx = torch.from_numpy(rows[order]).to(self.device)
        tensors = {name: t[idx].contiguous().cpu() for name, t in self.columns.items()}
        tensors[LAST_SEEN] = torch.from_numpy(self._last_seen[rows[order]].copy())
        metadata = {
            "format": SNAPSHOT_FORMAT,
            "identity": json.dumps(self.identity, sort_keys=True),
            "ids": json.dumps(ids),
            "evictions": json.dumps(self.evictions),
            "extra": json.dumps(extra or {}),
        }
        return StateCopy(tensors, metadata)

    @staticmethod
    def read_snapshot(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for truncated/garbage files
            raise StateIncompatibleError(
                f"{path}: not a readable safetensors state snapshot ({exc})"
            ) from exc
        return tensors, _checked(metadata, str(path))

    @staticmethod
    def read_snapshot_bytes(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """:meth:`read_snapshot` of a snapshot held in memory (a cluster checkpoint); ``name`` is
        what an error calls it."""
        try:
            tensors = load(data)
            metadata = _metadata_of(data)
        except Exception as exc:
            raise StateIncompatibleError(
                f"{name}: not a readable safetensors state snapshot ({exc})"
            ) from exc
        return tensors, _checked(metadata, name)

    def restore(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Replace all state with the snapshot at ``path``; returns its ``extra`` metadata."""
        tensors, metadata = self.read_snapshot(path)
        return self.load(tensors, metadata, str(path))

    def load(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> dict[str, Any]:
        """Replace all state with a read snapshot (``path``: what an error calls it)."""
        theirs = json.loads(metadata["identity"])
        if theirs != self.identity:
            diff = sorted(
                k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k)
            )
            raise StateIncompatibleError(
                f"{path}: snapshot was written for another model/state layout ({diff})"
            )
        ids: list[str] = json.loads(metadata["ids"])
        if len(ids) > self.max_devices:
            ids = ids[len(ids) - self.max_devices :]  # keep the most recently used
        n = len(ids)
        for name in self.specs:
            if name not in tensors or tensors[name].shape[0] < n:
                raise StateIncompatibleError(f"{path}: column {name!r} missing or short")
        self._index.clear()
        self._row_ids = [None] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))
        self._last_used[:] = 0
        self._init_rows(np.arange(self.capacity))
        if n > self.capacity:
            self._grow(min(self.max_devices, max(n, self.chunk)))
        offset = len(json.loads(metadata["ids"])) - n
        rows = np.arange(n, dtype=np.int64)
        for name in self.specs:
            self.columns[name][:n] = tensors[name][offset:].to(self.device)
        for row, device_id in zip(rows.tolist(), ids, strict=True):
            self._index[device_id] = row
            self._row_ids[row] = device_id
        self._free = [r for r in self._free if r >= n]
        self._tick += 1
        self._last_used[rows] = self._tick + rows  # preserves the snapshot's LRU order
        self._tick += n
        seen = tensors.get(LAST_SEEN)
        self._last_seen[rows] = seen[offset:].numpy() if seen is not None else self.clock()
        self.evictions = json.loads(metadata.get("evictions", '{"lru": 0, "ttl": 0}'))
        extra: dict[str, Any] = json.loads(metadata.get("extra", "{}"))
        return extra

    def copy_rows(self, device_ids: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Independent copies of the given devices' rows (for inspection and dry runs)."""
        out = {}
        for d in device_ids:
            row = self._index.get(d)
            if row is not None:
                out[d] = {name: t[row].clone() for name, t in self.columns.items()}
        return out


def _checked(metadata: dict[str, str], name: str) -> dict[str, str]:
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise StateIncompatibleError(f"{name}: not a sensorwatch state snapshot")
    return metadata


def _metadata_of(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors document (its JSON header, after an 8-byte length)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__") or {})
