"""Test-only fault injection: kill the process at a named step of a durability protocol, or kill
the thread that reaches a named point.

``SENSORWATCH_TEST_KILL_AT=POINT[:N]`` (read once, at import) makes the N-th (default 1st) arrival at
``point(POINT)`` send SIGKILL to the process itself — the same as ``kill -9`` at exactly that step.
Unset (always, outside the fault-injection tests) a point costs one comparison.

Points: ``wal.before_write``, ``wal.after_write``, ``wal.after_sync`` (the writer thread, around one
group commit), ``outputs.after_publish`` (results published, the message not yet acked),
``snapshot.before_rename``, ``snapshot.after_rename`` (before old log segments are deleted),
``replay.record`` (recovery, after applying a replayed record).

``SENSORWATCH_TEST_RAISE_AT=POINT[:N]`` makes the N-th arrival at ``point(POINT)`` raise
:class:`InjectedFault`, a ``BaseException`` that no ``except Exception`` catches: the thread that got
there dies, as a bug in it would kill it (the watchdog's tests). Points: ``batcher.step`` (the
micro-batcher, before scoring a batch), ``mqtt.message`` (paho's network thread, on a message).
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
RAISE_POINTS = ("batcher.step", "mqtt.message")


class InjectedFault(BaseException):
    """Raised at a ``SENSORWATCH_TEST_RAISE_AT`` point (never caught as an ``Exception``)."""


def _parse(variable: str, points: tuple[str, ...]) -> tuple[str, int] | None:
    spec = os.environ.get(variable)
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in points:
        raise ValueError(f"{variable}: unknown point {name!r} (one of {', '.join(points)})")
    return name, int(n or 1)


_target = _parse("SENSORWATCH_TEST_KILL_AT", POINTS)
_raise_target = _parse("SENSORWATCH_TEST_RAISE_AT", RAISE_POINTS)
_seen = 0
_raise_seen = 0
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


def raise_point(name: str) -> None:
    """A point where a thread can be made to die; raises :class:`InjectedFault` when told to."""
    global _raise_seen
    if _raise_target is None or _raise_target[0] != name:
        return
    with _lock:
        _raise_seen += 1
        if _raise_seen == _raise_target[1]:
            raise InjectedFault(f"injected fault at {name} (SENSORWATCH_TEST_RAISE_AT)")
