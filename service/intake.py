"""MQTT intake in its own process (the default, ``SENSORWATCH_MQTT_INTAKE=process``).

Why a process: paho's receive path is ~80 µs of Python per message. In the scorer's process it holds
the GIL in small slices between the scorer's tensor ops, and both threads wait for each other (a
"convoy"): measured, the service reached 0.48× a bare paho consumer on one-reading messages while
neither thread used a full core (docs/durability.md). Here paho, the JSON parsing and the message
digest run in a child process; the parent (engine, log, output stage) sees parsed messages in
chunks and sends back what to publish and ack.

The child is ``python -m service.intake`` with two pipes (pickled over
:class:`multiprocessing.connection.Connection`):

* child → parent, each send a pair ``(chunk, events)``: a chunk of :class:`ParsedMessage` in the
  columnar form of :func:`encode_chunk` (None if no message is due), sent once ``CHUNK`` are
  buffered or the oldest has waited ``FLUSH_S``; events ``("c", connected, reconnect)``,
  ``("d", seq)`` (outcomes up to record ``seq`` acknowledged by the broker), ``("f", ok)`` (a flush's
  answer), ``("e", why)`` (the network thread died), sent at once.
* parent → child, lists of commands executed in order: ``("p", topic, payload, qos, retain)``,
  ``("a", mid, qos)``, ``("k", seq)`` (a record's outcomes are all issued), ``("f", timeout)``,
  ``("s",)`` (stop).

Ordering holds end to end: the output stage publishes a batch's outcomes, then acks its messages,
then marks it; the child executes the commands in that order on one paho client, whose delivery
tracking (:meth:`MqttAdapter.mark`) reports the record back only once the broker acknowledged
every publish issued before the mark.

Lifetime: the parent starts the child in :meth:`IntakeProcess.start` and stops it with ``("s",)``
(the child publishes ``offline`` and disconnects cleanly). When the parent dies — a crash, a kill -9 —
the child reads end-of-file on its command pipe and exits at once *without* a clean disconnect: the
broker publishes the last will and keeps the persistent session, with every unacked message, for
the restarted service. The child ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group;
the parent decides). When the child dies, the parent's ``failure`` says so and ``/readyz`` answers
503; nothing it had taken in was acked, so the broker redelivers it to the next session.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from itertools import chain
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import numpy as np

from sensorwatch.scoring.batch import clean_columns
from service.mqtt import InboundMessage, MqttAdapter
from service.payloads import (
    DEADLETTER_PAYLOAD_CHARS,
    PayloadError,
    TopicMatcher,
    message_digest,
    parse_message,
)
from service.settings import Settings

log = logging.getLogger("sensorwatch.intake")

#: Messages per chunk sent to the parent, and the longest the first of a chunk waits for the rest.
CHUNK = 256
FLUSH_S = 0.001
#: A dead-letter quotes at most this much of a payload (see ``deadletter``): only that much crosses.
PAYLOAD_KEPT = DEADLETTER_PAYLOAD_CHARS * 4 + 1


class ParsedMessage(NamedTuple):
    """One MQTT message, parsed: its readings as parallel lists, or why it is refused whole."""

    topic: str
    payload: bytes  # at most PAYLOAD_KEPT bytes: what a dead letter quotes
    qos: int
    mid: int
    retain: bool
    dup: bool
    digest: bytes
    device: str | None
    ts: list[Any]
    values: list[Any]
    reason: str | None = None
    detail: str = ""
    #: ≥ 0: the readings are clean (:func:`clean_columns`): ``values`` is flat, ``width`` per reading
    #: — lists in the child, arrays after :func:`decode_chunk`; -1: as parsed (lists).
    width: int = -1


class Parser:
    """Turns an :class:`InboundMessage` into a :class:`ParsedMessage`; never raises."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device_of = TopicMatcher(settings.topic_readings)

    def __call__(self, msg: InboundMessage) -> ParsedMessage:
        s = self.settings
        kept = msg.payload if len(msg.payload) <= PAYLOAD_KEPT else msg.payload[:PAYLOAD_KEPT]
        digest = message_digest(msg.topic, msg.payload)
        device = self.device_of(msg.topic)
        head = (msg.topic, kept, msg.qos, msg.mid, msg.retain, msg.dup, digest, device)
        try:
            if msg.retain and not s.mqtt_accept_retained:
                # The broker's stored copy of an old message, sent again on every (re)subscribe: not a
                # new reading (a restart would score it twice or dead-letter it as out_of_order).
                raise PayloadError(
                    "retained", "a retained message is the broker's replay of an old one, not a new reading"
                )
            if device is None:
                raise PayloadError(
                    "bad_topic", f"topic {msg.topic[:200]!r} does not match {s.topic_readings!r}"
                )
            ts, values = parse_message(
                msg.payload, device, max_bytes=s.max_payload_bytes, max_readings=s.max_request_readings
            )
        except PayloadError as exc:
            return ParsedMessage(*head, [], [], exc.reason, exc.detail)
        except Exception as exc:  # a bug, not an input: still one outcome, and intake goes on
            log.exception("MQTT message on %r not parsed", msg.topic[:200])
            return ParsedMessage(*head, [], [], "internal_error", f"not parsed: {exc}")
        clean = clean_columns(ts, values)
        if clean is None:
            return ParsedMessage(*head, ts, values)
        return ParsedMessage(*head, clean[0], clean[1], width=clean[2])


def encode_chunk(messages: list[ParsedMessage]) -> tuple[list[tuple[Any, ...]], np.ndarray, np.ndarray]:
    """What crosses the pipe for a chunk of messages: each message's fields as a plain tuple, with the
    readings of every clean message moved into two float64 arrays for the whole chunk (timestamps,
    flat values); other messages keep their readings as parsed. Measured for 50-reading messages:
    pickling a list of :class:`ParsedMessage` with float lists cost 3.3 µs per message to write and
    6.6 to read, this 0.2 and 0.15; and the parent gets the readings as arrays, no per-reading work."""
    heads: list[tuple[Any, ...]] = []
    ts: list[list[Any]] = []
    flat: list[list[Any]] = []
    for m in messages:
        if m.width >= 0:
            heads.append((*m[:8], len(m.ts), None, *m[10:]))
            ts.append(m.ts)
            flat.append(m.values)
        else:
            heads.append(tuple(m))
    return (
        heads,
        np.array(list(chain.from_iterable(ts)), dtype=np.float64),
        np.array(list(chain.from_iterable(flat)), dtype=np.float64),
    )


def decode_chunk(chunk: tuple[list[tuple[Any, ...]], np.ndarray, np.ndarray]) -> list[ParsedMessage]:
    """The messages of :func:`encode_chunk`, clean ones with ``ts`` (n,) and ``values`` (n, width)
    arrays (views into the chunk's)."""
    heads, ts, flat = chunk
    out: list[ParsedMessage] = []
    at = fat = 0
    for h in heads:
        width = h[12]
        if width < 0:
            out.append(ParsedMessage._make(h))
            continue
        n = h[8]
        size = n * width
        values = flat[fat : fat + size].reshape(n, width)
        out.append(ParsedMessage._make((*h[:8], ts[at : at + n], values, h[10], h[11], width)))
        at, fat = at + n, fat + size
    return out


def start_child(module: str) -> tuple[subprocess.Popen[bytes], Connection, Connection]:
    """``python -m <module> CMD_FD OUT_FD`` with two pipes: (the child, our command end, our output
    end). Only the child holds the other ends, so its death is our end-of-file and ours is its."""
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", module, str(cmd_r), str(out_w)],
        pass_fds=(cmd_r, out_w),
        stdin=subprocess.DEVNULL,
    )
    os.close(cmd_r)
    os.close(out_w)
    return proc, Connection(cmd_w, readable=False), Connection(out_r, writable=False)


# ---------------------------------------------------------------------------------------------- parent
class IntakeProcess:
    """The parent's handle on the intake child: the adapter surface the service uses (``start``,
    ``connected``, ``publish``, ``ack``, ``mark``/``on_delivered``, ``flush``, ``stop``)."""

    def __init__(
        self,
        settings: Settings,
        on_messages: Callable[[list[ParsedMessage]], None],
        on_connection_change: Callable[[bool, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_messages = on_messages
        self._on_change = on_connection_change or (lambda connected, reconnect: None)
        #: Called with a record's seq once the broker acknowledged everything published for it.
        self.on_delivered: Callable[[int], None] = lambda seq: None
        self._connected = threading.Event()
        self._outbox: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._flushed: bool | None = None  # the child's answer to the last flush
        self._flush_cond = threading.Condition()
        self.died: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cmd: Connection | None = None
        self._events: Connection | None = None
        self._rx = threading.Thread(target=self._receive, name="sensorwatch-intake-rx", daemon=True)
        self._tx = threading.Thread(target=self._send, name="sensorwatch-intake-tx", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._proc, self._cmd, self._events = start_child("service.intake")
        self._cmd.send((self.settings, logging.getLogger().getEffectiveLevel()))
        self._rx.start()
        self._tx.start()

    @property
    def connected(self) -> bool:
        """Connected to the broker through a live child (a dead child is never connected, even
        before its end of file has reached the receiver thread)."""
        return self._connected.is_set() and self.alive

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.died is None

    def stop(self, timeout: float = 10.0) -> None:
        """The child publishes ``offline``, disconnects cleanly and exits."""
        self._command(("s",), urgent=True)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._tx.is_alive():
            self._tx.join(timeout)  # every command written before the child is waited for
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("MQTT intake process did not stop within %.0f s; killed", timeout)
                self._proc.kill()
                self._proc.wait()
        self._connected.clear()

    # ------------------------------------------------------------------ outputs (any thread)
    def publish(self, topic: str, payload: bytes, qos: int | None = None, retain: bool = False) -> None:
        self._command(("p", topic, payload, self.settings.qos if qos is None else qos, retain))

    def ack(self, msg: ParsedMessage | InboundMessage) -> None:
        if msg.qos > 0:
            self._command(("a", msg.mid, msg.qos))

    def mark(self, seq: int) -> None:
        self._command(("k", seq), urgent=True)

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged everything published so far (False: not in time)."""
        with self._flush_cond:
            self._flushed = None
        self._command(("f", timeout), urgent=True)
        deadline = time.monotonic() + timeout + 2.0
        with self._flush_cond:
            while self._flushed is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return False
                self._flush_cond.wait(min(left, 0.2))
            return self._flushed

    def _command(self, cmd: tuple[Any, ...], urgent: bool = False) -> None:
        with self._cond:
            was_empty = not self._outbox
            self._outbox.append(cmd)
            if was_empty or urgent:
                self._cond.notify_all()

    # ------------------------------------------------------------------ threads
    def _send(self) -> None:
        assert self._cmd is not None
        while True:
            with self._cond:
                while not self._outbox and not self._closed:
                    self._cond.wait()
                batch, self._outbox = self._outbox, []
                closed = self._closed
            if batch:
                try:
                    self._cmd.send(batch)
                except OSError:  # the child is gone: _receive reports it
                    return
            if closed and not self._outbox:
                self._cmd.close()
                return

    def _receive(self) -> None:
        assert self._events is not None
        while True:
            try:
                messages, events = self._events.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("unreadable message from the MQTT intake process")
                break
            for ev in events:
                self._event(ev)
            if messages:
                try:
                    self._on_messages(decode_chunk(messages))
                except Exception:  # the service's handler catches per message; this is a last guard
                    log.exception("MQTT messages from the intake process not handled")
        if not self._closed:
            self.died = "the MQTT intake process exited"
            log.error("%s (code %s); not ready", self.died, None if self._proc is None else self._proc.poll())
        if self._connected.is_set():
            self._connected.clear()
            self._on_change(False, False)
        with self._flush_cond:
            self._flush_cond.notify_all()

    def _event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "d":
            self.on_delivered(ev[1])
        elif kind == "c":
            if ev[1]:
                self._connected.set()
            else:
                self._connected.clear()
            self._on_change(ev[1], ev[2])
        elif kind == "f":
            with self._flush_cond:
                self._flushed = ev[1]
                self._flush_cond.notify_all()
        elif kind == "e":
            self.died = ev[1]
            log.error("MQTT intake process: %s; not ready", ev[1])


# ---------------------------------------------------------------------------------------------- child
class _Child:
    """The child's side: one thread runs paho's loop (its documented external-loop calls
    ``loop_read``/``loop_write``/``loop_misc`` over one ``select`` with the command pipe), parses, and
    sends chunks. One thread, because per message the work is small and a hand-over between
    threads is not: with paho's own network thread plus a command thread, every ack woke the network
    thread through its socket pair and the threads took turns for the GIL (~150 µs per message
    measured, against ~100 µs for a bare paho consumer doing the same)."""

    def __init__(self, settings: Settings, commands: Connection, events: Connection) -> None:
        self.commands = commands
        self.events = events
        self.parse = Parser(settings)
        self._messages: list[ParsedMessage] = []
        self._other: list[tuple[Any, ...]] = []
        self._first_at = 0.0
        self.adapter = MqttAdapter(settings, self._on_message, self._on_change)
        self.adapter.on_delivered = lambda seq: self._other.append(("d", seq))
        self._flush_deadline: float | None = None  # a flush asked for, not answered yet
        self._stop_deadline: float | None = None

    def _on_message(self, msg: InboundMessage) -> None:  # inside loop_read: never raises
        if not self._messages:
            self._first_at = time.monotonic()
        self._messages.append(self.parse(msg))

    def _on_change(self, connected: bool, reconnect: bool) -> None:
        self._other.append(("c", connected, reconnect))

    def _send(self, now: float) -> None:
        """Events at once; messages once ``CHUNK`` are buffered or the first waited ``FLUSH_S``."""
        due = self._messages and (len(self._messages) >= CHUNK or now - self._first_at >= FLUSH_S)
        if not (due or self._other):
            return
        chunk = None
        if due:
            chunk = encode_chunk(self._messages)
            self._messages = []
        other, self._other = self._other, []
        try:
            self.events.send((chunk, other))
        except OSError:
            os._exit(0)  # the parent is gone (see the module docstring)

    def _execute(self, batch: list[tuple[Any, ...]]) -> None:
        a = self.adapter
        for cmd in batch:
            op = cmd[0]
            if op == "a":
                a.client.ack(cmd[1], cmd[2])
            elif op == "p":
                a.publish(cmd[1], cmd[2], cmd[3], cmd[4])
            elif op == "k":
                a.mark(cmd[1])
            elif op == "f":
                self._flush_deadline = time.monotonic() + cmd[1]
            elif op == "s":
                self._stop_deadline = time.monotonic() + 5.0
                if a.connected:
                    a.publish_offline()

    def run(self) -> None:
        a, client = self.adapter, self.adapter.client
        a.start(threaded=False)
        cmd_fd = self.commands.fileno()
        next_connect, backoff, next_misc = 0.0, 1.0, 0.0
        while True:
            now = time.monotonic()
            sock = client.socket()
            if a.connected:
                backoff = 1.0
            if sock is None and self._stop_deadline is None and now >= next_connect:
                # Every attempt pushes the next one back, whether it fails here or later: a broker
                # that refuses the CONNECT (a wrong password) or the client certificate accepts the
                # TCP connection and closes it at once, and would be asked again in a tight loop.
                next_connect, backoff = now + backoff, min(backoff * 2, 30.0)
                try:
                    client.reconnect()  # blocking TCP connect + TLS handshake; CONNECT is queued
                except OSError as exc:
                    a.connect_failed(exc)  # logged once per cause (the URL may hold a password)
                sock = client.socket()
            timeout = 0.5 if sock is not None else max(0.0, min(0.5, next_connect - now))
            if self._messages:
                timeout = max(0.0, min(timeout, self._first_at + FLUSH_S - now))
            if sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
                timeout = 0.0  # TLS: bytes already decrypted wait in the socket object
            rlist: list[Any] = [cmd_fd] if sock is None else [cmd_fd, sock]
            wlist: list[Any] = [sock] if sock is not None and client.want_write() else []
            try:
                readable, _, _ = select.select(rlist, wlist, [], timeout)
            except (OSError, ValueError):
                readable = []  # the socket closed under us: paho notices on the next call
            if sock is not None and (sock in readable or timeout == 0.0):
                client.loop_read()
            if cmd_fd in readable:
                try:
                    while self.commands.poll():
                        self._execute(self.commands.recv())
                except (EOFError, OSError):
                    # The parent died (crash, kill -9): leave without a clean disconnect, so the
                    # broker publishes the will and keeps every unacked message for the next session.
                    os._exit(0)
            if client.socket() is not None and client.want_write():
                client.loop_write()
            now = time.monotonic()
            if client.socket() is not None and now >= next_misc:
                client.loop_misc()  # keepalive
                next_misc = now + 0.5
            if self._flush_deadline is not None and (
                a.all_acked or now >= self._flush_deadline or not a.connected
            ):
                self._other.append(("f", a.all_acked))
                self._flush_deadline = None
            if self._stop_deadline is not None and (
                a.all_acked or now >= self._stop_deadline or not a.connected
            ):
                client.disconnect()  # queues DISCONNECT and closes after writing it
                if client.socket() is not None:
                    client.loop_write()
                self._send(float("inf"))
                return
            self._send(now)


def child_ends(argv: list[str]) -> tuple[Connection, Connection]:
    """In a child of :func:`start_child`: its (command, output) pipe ends from ``argv``. SIGINT and
    SIGTERM are ignored: a Ctrl-C reaches the whole process group, and the parent decides (the
    child ends at the end-of-file of its command pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False)


def main(argv: list[str]) -> int:
    commands, events = child_ends(argv)
    try:
        settings, level = commands.recv()
    except (EOFError, OSError):
        return 0
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[intake]: %(message)s")
    child = _Child(settings, commands, events)
    gc.collect()
    gc.freeze()  # as the service does (runtime.freeze_heap): start-up objects out of the GC's sight
    child.run()
    return 0


if __name__ == "__main__":
    from service import intake  # what crosses the pipe must be service.intake's, not __main__'s

    raise SystemExit(intake.main(sys.argv[1:]))
