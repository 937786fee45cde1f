"""A cluster worker parses its readings messages in a child process, as the single-node service's
MQTT intake does (service/intake.py), for the same reason.

Why: parsing a 50-reading JSON message into clean arrays is ~80 µs of Python (1.6 µs per reading),
half of what scoring it costs. In the worker's scoring thread it held the GIL in long slices, and the
event loop — the NATS client's fetches and acks, the leases, ``/metrics`` — waited for the GIL each
time it came back from the socket: measured (py-spy, 50-reading gateway messages), the loop thread
spent most of its non-idle time in socket writes and reads that were GIL waits, and one worker
drained 0.28× what the single-node service does. Here the child runs :class:`~service.intake.Parser`
(the same limits, reasons and digests) and sends back the chunk form of
:func:`~service.intake.encode_chunk` (the readings as two float64 arrays); the parent's scoring
thread holds the GIL only for the scorer's glue between its compiled kernels.

The child is ``python -m service.cluster.parsing`` with two pipes (pickled over
:class:`multiprocessing.connection.Connection`): parent → child ``(job, topics, payloads)``;
child → parent ``(job, chunk)``, in job order. It imports no torch (start-up ~0.7 s).

Lifetime: the child exits when its job pipe reaches end-of-file — the parent stopped it or died (a
kill -9 of the worker takes the child with it). When the child dies, every pending and later
:meth:`ParseProcess.parse` raises :class:`ParseProcessDied`; the worker then exits with status 70 for
its supervisor to restart it (its partitions are taken over meanwhile), as the single-node watchdog
does for a dead thread (service/runtime.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.intake import ParsedMessage, Parser, child_ends, decode_chunk, encode_chunk, start_child
from service.mqtt import InboundMessage
from service.settings import Settings


class ParseProcessDied(RuntimeError):
    """The parse process exited: nothing it was given comes back."""


class ParseProcess:
    """The parent's side (see module docstring); :meth:`parse` from one asyncio loop."""

    def __init__(self, settings: Settings, on_death: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        #: Called once, from the receiving thread, when the child has died (with why).
        self.on_death = on_death
        self.died: str | None = None
        self._jobs = itertools.count()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._lock = threading.Lock()
        # One sending thread: a pipe write of a large job may block until the child has read it.
        self._tx = ThreadPoolExecutor(1, thread_name_prefix="sensorwatch-parse-tx")
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def start(self) -> None:
        self._proc, self._jobs_w, self._out = start_child("service.cluster.parsing")
        self._jobs_w.send(self.settings)
        threading.Thread(target=self._receive, name="sensorwatch-parse-rx", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.died is None

    async def parse(self, topics: list[str], payloads: list[bytes]) -> list[ParsedMessage]:
        """The messages as the MQTT intake parses them (one :class:`ParsedMessage` each, in order)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self.died is not None:
                raise ParseProcessDied(self.died)
            job = next(self._jobs)
            self._pending[job] = (loop, future)
        try:
            await loop.run_in_executor(self._tx, self._jobs_w.send, (job, topics, payloads))
        except (OSError, ValueError) as exc:
            self._fail(f"the parse process is gone ({exc})")
        return decode_chunk(await future)

    def stop(self) -> None:
        """Close the job pipe (the child exits at its end-of-file) and reap the child."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._jobs_w.close()
        self._tx.shutdown(wait=False)
        if self._proc is not None:
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _receive(self) -> None:
        while True:
            try:
                job, chunk = self._out.recv()
            except (EOFError, OSError) as exc:
                code = self._proc.poll() if self._proc is not None else None
                self._fail(f"the parse process exited (status {code}; {type(exc).__name__})")
                return
            with self._lock:
                loop, future = self._pending.pop(job)
            loop.call_soon_threadsafe(_resolve, future, chunk)

    def _fail(self, why: str) -> None:
        with self._lock:
            first = self.died is None
            if first:
                self.died = why
            pending, self._pending = self._pending, {}
        for loop, future in pending.values():
            loop.call_soon_threadsafe(_reject, future, ParseProcessDied(why))
        if first and self.on_death is not None and not self._stopping:
            self.on_death(why)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def main(argv: list[str]) -> int:
    jobs, out = child_ends(argv)
    try:
        settings = jobs.recv()
        parser = Parser(settings)
        while True:
            job, topics, payloads = jobs.recv()
            parsed = [
                parser(InboundMessage(t, p, 1, 0, False)) for t, p in zip(topics, payloads, strict=True)
            ]
            out.send((job, encode_chunk(parsed)))
    except (EOFError, OSError):
        return 0  # the parent closed the pipe or died


if __name__ == "__main__":
    from service.cluster import parsing  # what crosses the pipe must be this module's, not __main__'s

    raise SystemExit(parsing.main(sys.argv[1:]))
