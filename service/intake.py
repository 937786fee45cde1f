"""MQTT intake in its own process (the default, ``SENSORWATCH_MQTT_INTAKE=process``).

Why a process: paho's receive path is ~80 µs of Python per message. In the scorer's process it holds
the GIL in small slices between the scorer's tensor ops, and both threads wait for each other (a
"convoy"): measured, the service reached 0.48× a bare paho consumer on one-reading messages while
neither thread used a full core (docs/durability.md). Here paho, the JSON parsing and the message
digest run in a child process; the parent (engine, log, output stage) sees parsed messages in
chunks and sends back what to publish and ack.

The child is ``python -m service.intake`` with two pipes (pickled lists over
:class:`multiprocessing.connection.Connection`):

* child → parent, each send a pair ``(messages, events)``: :class:`ParsedMessage` tuples, sent once
  ``CHUNK`` are buffered or the oldest has waited ``FLUSH_S``; events ``("c", connected, reconnect)``,
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

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

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
        return ParsedMessage(*head, ts, values)


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
        self._flushed: list[bool] = []
        self._flush_cond = threading.Condition()
        self.died: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cmd: Connection | None = None
        self._events: Connection | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        self._proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "service.intake", str(cmd_r), str(evt_w)],
            pass_fds=(cmd_r, evt_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(cmd_r)  # only the child holds these ends: its death is our EOF, ours is its EOF
        os.close(evt_w)
        self._cmd = Connection(cmd_w, readable=False)
        self._events = Connection(evt_r, writable=False)
        self._cmd.send((self.settings, logging.getLogger().getEffectiveLevel()))
        for target, name in ((self._receive, "sensorwatch-intake-rx"), (self._send, "sensorwatch-intake-tx")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

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
        for t in self._threads:
            if t.name.endswith("tx"):
                t.join(timeout)
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
            self._flushed.clear()
        self._command(("f", timeout), urgent=True)
        deadline = time.monotonic() + timeout + 2.0
        with self._flush_cond:
            while not self._flushed:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    return False
                self._flush_cond.wait(min(left, 0.2))
            return self._flushed[0]

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
                    self._on_messages(messages)
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
                self._flushed.append(ev[1])
                self._flush_cond.notify_all()
        elif kind == "e":
            self.died = ev[1]
            log.error("MQTT intake process: %s; not ready", ev[1])


# ---------------------------------------------------------------------------------------------- child
class _Child:
    """The child's side: paho (through :class:`MqttAdapter`), parsing, and the chunked event pipe."""

    def __init__(self, settings: Settings, events: Connection) -> None:
        self.events = events
        self.parse = Parser(settings)
        self._messages: list[ParsedMessage] = []
        self._other: list[tuple[Any, ...]] = []
        self._first_at = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self.adapter = MqttAdapter(settings, self._on_message, self._on_change)
        self.adapter.on_delivered = lambda seq: self._event(("d", seq))

    def _on_message(self, msg: InboundMessage) -> None:  # paho's thread: never raises
        parsed = self.parse(msg)
        with self._cond:
            if not self._messages:
                self._first_at = time.monotonic()
                self._cond.notify_all()
            self._messages.append(parsed)
            if len(self._messages) == CHUNK:
                self._cond.notify_all()

    def _on_change(self, connected: bool, reconnect: bool) -> None:
        self._event(("c", connected, reconnect))

    def _event(self, ev: tuple[Any, ...]) -> None:
        with self._cond:
            self._other.append(ev)
            self._cond.notify_all()

    def flusher(self) -> None:
        """Sends chunks and events; reports a dead network thread."""
        reported = False
        while True:
            with self._cond:
                while not self._messages and not self._other and not self._closed:
                    self._cond.wait(1.0)
                    if not reported and self.adapter.connected and not self.adapter.alive:
                        reported = True
                        self._other.append(("e", "the MQTT network thread died"))
                while (
                    not self._other
                    and not self._closed
                    and len(self._messages) < CHUNK
                    and (left := self._first_at + FLUSH_S - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                messages, self._messages = self._messages, []
                other, self._other = self._other, []
                closed = self._closed
            if messages or other:
                try:
                    self.events.send((messages, other))
                except OSError:
                    os._exit(0)  # the parent is gone
            if closed:
                return

    def run(self, commands: Connection) -> None:
        flusher = threading.Thread(target=self.flusher, name="sensorwatch-intake-flush", daemon=True)
        flusher.start()
        self.adapter.start()
        a = self.adapter
        while True:
            try:
                batch = commands.recv()
            except (EOFError, OSError):
                # The parent died (crash, kill -9): leave without a clean disconnect, so the broker
                # publishes the will and keeps every unacked message for the next session.
                os._exit(0)
            for cmd in batch:
                op = cmd[0]
                if op == "a":
                    a.client.ack(cmd[1], cmd[2])
                elif op == "p":
                    a.publish(cmd[1], cmd[2], cmd[3], cmd[4])
                elif op == "k":
                    a.mark(cmd[1])
                elif op == "f":
                    self._event(("f", a.flush(cmd[1])))
                elif op == "s":
                    a.stop()
                    with self._cond:
                        self._closed = True
                        self._cond.notify_all()
                    flusher.join(5)
                    return


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    commands = Connection(int(argv[0]), writable=False)
    events = Connection(int(argv[1]), readable=False)
    try:
        settings, level = commands.recv()
    except (EOFError, OSError):
        return 0
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[intake]: %(message)s")
    _Child(settings, events).run(commands)
    return 0


if __name__ == "__main__":
    from service import intake  # what crosses the pipe must be service.intake's, not __main__'s

    raise SystemExit(intake.main(sys.argv[1:]))
