"""Write-ahead log: numbered, framed, checksummed records in segment files, group-committed.

A record is ``seq`` (u64, consecutive from 1) and an opaque payload (see :mod:`.records`). On disk:

* segment files ``STATE_DIR/wal/<first seq, 20 digits>.log``, each a run of frames;
* a frame = header ``<len u32> <seq u64> <payload crc32 u32> <header crc32 u32>`` + payload. The
  header has its own CRC so that a flipped bit in a length is caught as corruption instead of being
  mistaken for a short (torn) last record.

Reading back (:func:`scan`) tells a torn tail from corruption:

* the bytes after the last good frame are a *torn tail* when they are shorter than a header, or a
  frame whose end lies past the end of the file, or when they are all zero (a file system may zero-fill
  blocks allocated by a write that never completed): they are cut off (:meth:`WriteAheadLog.open` logs
  a line) — only ever in the newest segment;
* a frame that fails its CRC with more non-zero bytes after it, a torn frame in an older segment, or a
  gap in the sequence is corruption (:class:`WalCorruptError`, naming the file and offset): the
  service refuses to start rather than skip state changes.

Writing (:class:`WriteAheadLog`): :meth:`~WriteAheadLog.append` numbers and frames a record and queues
it without blocking; one writer thread writes everything queued in one ``write`` and, with
``sync="fsync"``, makes it durable with one ``fdatasync`` — a *group commit*: one sync covers every
record appended since the last one. ``on_durable(seq)`` is called (on the writer thread) once every
record up to ``seq`` is durable; with ``sync="none"`` records are written (they survive a kill of the
process, not a host crash) and reported at once.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> log = WriteAheadLog(d, sync="fsync")
>>> list(log.open())
[]
>>> log.start()
>>> [log.append(b"a"), log.append(b"b")]
[1, 2]
>>> log.wait_durable(2, timeout=5)
True
>>> log.close()
>>> [(seq, bytes(p)) for seq, p in WriteAheadLog(d).open()]
[(1, b'a'), (2, b'b')]
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sensorwatch import faults

log = logging.getLogger("sensorwatch.wal")

HEADER = struct.Struct("<IQII")
#: Largest payload accepted (a frame length beyond it is corruption, not a big record).
MAX_RECORD_BYTES = 1 << 30
SEGMENT_SUFFIX = ".log"
SyncMode = Literal["fsync", "none"]


class WalCorruptError(RuntimeError):
    """The log cannot be replayed as written (a bad record in the middle, a gap in the sequence)."""


def encode_frame(seq: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One frame: header (with its own CRC) + payload.

    >>> len(encode_frame(1, b"xyz")) == HEADER.size + 3
    True
    """
    crc = zlib.crc32(payload)
    head = struct.pack("<IQI", len(payload), seq, crc)
    return head + struct.pack("<I", zlib.crc32(head)) + bytes(payload)


@dataclass(frozen=True)
class ScanResult:
    """The good frames of one segment and where they end (``good_end`` < file size: a torn tail)."""

    records: list[tuple[int, memoryview]]
    good_end: int
    size: int


def scan(path: Path, *, last: bool) -> ScanResult:
    """Read every frame of one segment (see module docstring for torn tail versus corruption)."""
    data = memoryview(path.read_bytes())
    size, pos = len(data), 0
    records: list[tuple[int, memoryview]] = []
    while pos < size:
        problem = _frame_problem(data, pos)
        if problem is None:
            length, seq, _, _ = HEADER.unpack_from(data, pos)
            records.append((seq, data[pos + HEADER.size : pos + HEADER.size + length]))
            pos += HEADER.size + length
            continue
        torn = problem == "short" or not any(data[pos:])
        if torn and last:
            return ScanResult(records, pos, size)
        what = "a torn record in an older segment" if torn else f"a corrupt record ({problem})"
        raise WalCorruptError(f"write-ahead log {path} at offset {pos}: {what}; refusing to skip it")
    return ScanResult(records, pos, size)


def _frame_problem(data: memoryview, pos: int) -> str | None:
    """None for a good frame at ``pos``; 'short' when it runs past the end; else what is wrong."""
    if len(data) - pos < HEADER.size:
        return "short"
    length, _, crc, head_crc = HEADER.unpack_from(data, pos)
    if zlib.crc32(data[pos : pos + HEADER.size - 4]) != head_crc:
        return "header checksum mismatch"
    if length > MAX_RECORD_BYTES:
        return f"length {length} too large"
    end = pos + HEADER.size + length
    if end > len(data):
        return "short"
    if zlib.crc32(data[pos + HEADER.size : end]) != crc:
        # A payload that does not match while nothing follows it is a write cut short.
        return "short" if not any(data[end:]) else "payload checksum mismatch"
    return None


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


class WriteAheadLog:
    """Segmented, group-committed write-ahead log (see module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        sync: SyncMode = "fsync",
        segment_bytes: int = 64 << 20,
        on_durable: Callable[[int], None] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.sync = sync
        self.segment_bytes = segment_bytes
        self.on_durable = on_durable
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._next_seq = 1
        self._queued_seq = 0  # last seq handed to the writer
        self._durable = 0
        self._closed = False
        self._error: BaseException | None = None
        self._fd: int | None = None
        self._segment_size = 0
        self._segments: list[tuple[int, Path]] = []  # (first seq, path), oldest first
        self._obsolete = False
        self.bytes_written = 0  # since start, for the snapshot trigger
        self.syncs = 0
        self._thread = threading.Thread(target=self._run, name="sensorwatch-wal", daemon=True)

    # ------------------------------------------------------------------ recovery
    def open(self, after: int = 0) -> Iterator[tuple[int, memoryview]]:
        """Check every segment, cut a torn tail, and yield the records with ``seq > after`` in order.

        Records must be consecutive from the first one kept on disk; the first one yielded must be
        ``after + 1`` (else a gap: the snapshot and the log do not meet). Must run before :meth:`start`.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.dir.glob(f"*{SEGMENT_SUFFIX}"))
        prev: int | None = None
        resumed = False
        for i, path in enumerate(paths):
            res = scan(path, last=i == len(paths) - 1)
            if res.good_end < res.size:
                self._truncate(path, res)
            self._segments.append((int(path.stem) if path.stem.isdigit() else 0, path))
            for seq, payload in res.records:
                expected = self._segments[-1][0] if prev is None else prev + 1
                if seq != expected:
                    raise WalCorruptError(
                        f"write-ahead log {path}: record {seq} where {expected} was expected "
                        "(a gap in the sequence); refusing to skip it"
                    )
                prev = seq
                if seq <= after:
                    continue
                if not resumed and seq != after + 1:
                    raise WalCorruptError(
                        f"write-ahead log {path}: the snapshot covers records up to {after} but the log "
                        f"resumes at {seq}; records {after + 1}..{seq - 1} are missing"
                    )
                resumed = True
                yield seq, payload
        # Everything on disk is already in the snapshot (or there is nothing): those segments go.
        self._obsolete = prev is None or prev <= after
        self._next_seq = max(prev or 0, after) + 1
        if self._segments and self._segments[-1][0] > self._next_seq:
            raise WalCorruptError(
                f"write-ahead log {self._segments[-1][1]}: starts at record {self._segments[-1][0]} but "
                f"the snapshot and the log end at {self._next_seq - 1}; records in between are missing"
            )
        self._queued_seq = self._durable = self._next_seq - 1

    def _truncate(self, path: Path, res: ScanResult) -> None:
        log.warning(
            "write-ahead log %s: torn last record at offset %d (%d bytes) cut off (a write interrupted "
            "by a crash; its readings were never acknowledged)",
            path,
            res.good_end,
            res.size - res.good_end,
        )
        with open(path, "rb+") as fh:
            fh.truncate(res.good_end)
            os.fsync(fh.fileno())

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # ------------------------------------------------------------------ writing
    def start(self) -> None:
        old = list(self._segments) if self._obsolete else []
        self._open_segment(self._next_seq)
        for _, path in old:
            if path != self._segments[-1][1]:
                path.unlink(missing_ok=True)
        self._segments = [s for s in self._segments if s not in old or s == self._segments[-1]]
        self._thread.start()

    def append(self, payload: bytes) -> int:
        """Number, frame and queue one record (never blocks on the disk); returns its seq.

        Callers that need records in a given order (the engine: its state changes) append under
        their own lock.
        """
        with self._cond:
            if self._error is not None:
                raise RuntimeError("write-ahead log writer failed") from self._error
            if self._closed:
                raise RuntimeError("write-ahead log is closed")
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append(encode_frame(seq, payload))
            self._queued_seq = seq
            self._cond.notify_all()
        return seq

    @property
    def durable(self) -> int:
        return self._durable

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._durable < seq and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return self._durable >= seq

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def close(self, timeout: float = 30.0) -> None:
        """Write and sync everything queued, then stop the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue and self._closed:
                        return
                    frames, self._queue = self._queue, []
                    last = self._queued_seq
                self._write(frames, last)
                with self._cond:
                    self._durable = last
                    self._cond.notify_all()
                if self.on_durable is not None:
                    self.on_durable(last)
        except BaseException as exc:  # the service turns unready; nothing more is acked
            log.exception("write-ahead log writer failed")
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _write(self, frames: list[bytes], last: int) -> None:
        """Group commit: every frame queued since the last sync in one write and one fdatasync."""
        data = b"".join(frames)
        assert self._fd is not None
        faults.point("wal.before_write")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._segment_size += len(data)
        self.bytes_written += len(data)
        faults.point("wal.after_write")
        if self.sync == "fsync":
            os.fdatasync(self._fd)
            self.syncs += 1
        faults.point("wal.after_sync")
        if self._segment_size >= self.segment_bytes:
            self._open_segment(last + 1)

    def _open_segment(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        path = self.dir / segment_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_size = os.fstat(self._fd).st_size  # an empty segment left by a crash is reused
        _fsync_dir(self.dir)  # the new file's directory entry must survive a host crash too
        if not self._segments or self._segments[-1][1] != path:
            self._segments.append((first_seq, path))

    # ------------------------------------------------------------------ retention
    def drop_through(self, seq: int) -> int:
        """Delete segments whose records are all ``<= seq`` (covered by a durable snapshot).

        The segment being written is never deleted. Returns how many files were removed.
        """
        removed = 0
        while len(self._segments) > 1 and self._segments[1][0] - 1 <= seq:
            _, path = self._segments.pop(0)
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            _fsync_dir(self.dir)
        return removed

    def segment_count(self) -> int:
        return len(self._segments)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
