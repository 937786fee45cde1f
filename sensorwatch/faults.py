"""Test-only fault injection: kill the process at a named step of a durability protocol.

``SENSORWATCH_TEST_KILL_AT=POINT[:N]`` (read once, at import) makes the N-th (default 1st) arrival at
``point(POINT)`` send SIGKILL to the process itself — the same as ``kill -9`` at exactly that step.
Unset (always, outside the fault-injection tests) a point costs one comparison.

Points: ``wal.before_write``, ``wal.after_write``, ``wal.after_sync`` (the writer thread, around one
group commit), ``outputs.after_publish`` (results published, the message not yet acked),
``snapshot.before_rename``, ``snapshot.after_rename`` (before old log segments are deleted),
``replay.record`` (recovery, after applying a replayed record).
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "wal.before_write",
    "wal.after_write",
    "wal.after_sync",
    "outputs.after_publish",
    "snapshot.before_rename",
    "snapshot.after_rename",
    "replay.record",
)


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"SENSORWATCH_TEST_KILL_AT: unknown point {name!r} (one of {', '.join(POINTS)})")
    return name, int(n or 1)


_target = _parse(os.environ.get("SENSORWATCH_TEST_KILL_AT"))
_seen = 0
_lock = threading.Lock()


def point(name: str) -> None:
    """A protocol step; kills the process here when the environment says so."""
    global _seen
    if _target is None or _target[0] != name:
        return
    with _lock:
        _seen += 1
        if _seen >= _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
