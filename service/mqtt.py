"""The MQTT adapter — the only module that imports paho-mqtt.

The rest of the service sees :class:`InboundMessage` (a named tuple) and the calls ``start``,
``publish``, ``ack``, ``mark`` (delivery tracking), ``flush`` and ``stop``. With ``start()`` paho runs
its network loop in its own thread and reconnects by itself (backoff 1 s → 30 s); the intake process
(:mod:`service.intake`) runs the loop itself instead (``start(threaded=False)``). On every
(re)connect the adapter subscribes again and republishes the retained ``online`` status. The session
is persistent (stable client id, ``clean_start=False``, a session expiry), messages are acked
manually — only once every reading in them has an outcome — so QoS1 readings published while the
service is away or restarting are delivered afterwards.

A connection that cannot be made (broker unreachable, TLS refused either way, CONNECT refused) is
retried forever with the backoff — the broker or its certificates may be fixed without touching the
service, and ``/readyz`` says 503 meanwhile — and its cause is logged once, in one line, and again
only when the cause changes or after the service was connected in between (:meth:`MqttAdapter.
connect_failed`): a retry every 30 s for a week must not bury the one line that says what is wrong.
"""

from __future__ import annotations

import logging
import re
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from sensorwatch import faults
from service.settings import Settings

log = logging.getLogger("sensorwatch.mqtt")

#: How many unacked QoS1 messages the broker may have in flight to us (MQTT 5 Receive Maximum).
RECEIVE_MAXIMUM = 1000
#: How many of our own QoS1 publishes may await the broker's PUBACK at once (0: no limit).
OUTGOING_INFLIGHT = 0


#: Appended to a connection failure's (single) log line.
RETRYING = "; retrying (logged again only if the cause changes)"
#: CONNACK reason codes that mean the credentials (MQTT 5; paho maps 3.1.1's return codes 4 and 5
#: to them). Mosquitto answers 135 for a wrong password as for a missing one.
CREDENTIAL_REFUSALS = (134, 135)


def describe_connect_error(exc: BaseException | None, settings: Settings) -> str:
    """One line for a failed connection attempt (what paho raised while connecting: TCP, TLS)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = f"CA file {settings.mqtt_ca_file}" if settings.mqtt_ca_file else "the system CAs"
        return f"TLS: broker certificate not trusted ({exc.verify_message}; checked against {ca})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({re.sub(r' [(]_ssl[.]c:[0-9]+[)]$', '', str(exc))})"
    if isinstance(exc, TimeoutError):
        return "broker unreachable (timed out)"
    if isinstance(exc, OSError):
        return f"broker unreachable ({exc.strerror or exc})"
    return f"connection failed ({exc.__class__.__name__}: {exc})" if exc else "connection failed"


class InboundMessage(NamedTuple):
    """One received message (a tuple: built once per message on paho's thread, so it must be cheap)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    dup: bool = False


class MqttAdapter:
    """Owns one paho client (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        on_message: Callable[[InboundMessage], None],
        on_connection_change: Callable[[bool, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_change = on_connection_change or (lambda connected, reconnect: None)
        self.status_topic = f"{settings.topic_prefix}/status"
        self._connected = threading.Event()
        self._ever_connected = False
        self._stopping = False
        self._problem: str | None = None  # the connection failure logged last (None: none since connected)
        self._connack = False  # this attempt got the broker's CONNACK
        # Publishes issued and acknowledged (on_publish: the broker's PUBACK for QoS1, the socket write
        # for QoS0), counted rather than tracked per MQTTMessageInfo: the info of a message published
        # while disconnected keeps rc NO_CONN even after paho sends it on reconnect, so its
        # is_published() raises. The broker acknowledges QoS1 messages in the order it received them.
        self.issued = 0
        self.acked = 0
        self._issued_at_loss = 0
        self._outstanding_cond = threading.Condition()
        # Delivery tracking: (record seq, publishes issued when its outcomes were all handed to paho).
        self._undelivered: deque[tuple[int, int]] = deque()
        #: Called with a record's seq once the broker acknowledged everything issued up to its mark.
        self.on_delivered: Callable[[int], None] = lambda seq: None
        v5 = settings.mqtt_protocol == "5"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.mqtt_client_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        b = settings.broker()
        if b["username"]:
            self.client.username_pw_set(b["username"], b["password"])
        if b["tls"]:
            self.client.tls_set(
                ca_certs=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
                certfile=str(settings.mqtt_cert_file) if settings.mqtt_cert_file else None,
                keyfile=str(settings.mqtt_key_file) if settings.mqtt_key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        # Outgoing QoS1 messages in flight: unlimited (0). With a limit, paho 2.2 scans every message
        # in flight on each PUBACK (~1000 steps for a window of 1000: a third of the CPU when scores
        # are published) and strands messages it holds back ("queued") across a reconnect (measured:
        # 88 of 900 lost through a broker restart with a window of 100). Our own batches bound it.
        self.client.max_inflight_messages_set(OUTGOING_INFLIGHT)
        self.client.max_queued_messages_set(0)  # outgoing: unbounded in paho, bounded by our batches
        self.client.on_pre_connect = self._handle_pre_connect
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_subscribe = self._handle_subscribe
        self.client.on_publish = self._handle_publish
        self._subscribe_mid: int | None = None
        self._host, self._port = b["host"], b["port"]

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, threaded: bool = True) -> None:
        """Set the connection up; with ``threaded`` paho's own network thread runs it (else the
        caller runs the loop: :class:`service.intake._Child`)."""
        if self.settings.mqtt_protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.mqtt_session_expiry_s
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            self.client.connect_async(
                self._host,
                self._port,
                keepalive=self.settings.mqtt_keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self.client.connect_async(self._host, self._port, keepalive=self.settings.mqtt_keepalive_s)
        if threaded:
            self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish_offline(self) -> Any:
        """Publish the retained ``offline`` status ahead of a clean disconnect (which suppresses the
        will); its PUBACK is counted like any other."""
        self._stopping = True
        with self._outstanding_cond:
            self.issued += 1
        return self.client.publish(self.status_topic, b"offline", qos=1, retain=True)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained), flush, disconnect cleanly (the session is kept)."""
        self._stopping = True
        if self.connected:
            info = self.publish_offline()
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish offline status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------------ I/O
    def publish(self, topic: str, payload: bytes, qos: int | None = None, retain: bool = False) -> None:
        qos = self.settings.qos if qos is None else qos
        with self._outstanding_cond:
            self.issued += 1
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def _handle_publish(self, client: paho.Client, userdata: object, mid: int, *rest: object) -> None:
        with self._outstanding_cond:
            self.acked = min(self.issued, self.acked + 1)
            if self.acked >= self.issued:
                self._outstanding_cond.notify_all()
        self._advance()

    def mark(self, seq: int) -> None:
        """Every outcome of record ``seq`` is published (handed to paho): it counts as delivered —
        for the log's "done" marks and for snapshots — once the broker acknowledged every publish
        issued up to now. A kill after ``publish()`` but before paho wrote the message would otherwise
        lose it for good (its redelivered input is only acked, as already applied)."""
        with self._outstanding_cond:
            self._undelivered.append((seq, self.issued))
        self._advance()

    def _advance(self) -> None:
        done = None
        with self._outstanding_cond:
            while self._undelivered and self._undelivered[0][1] <= self.acked:
                done = self._undelivered.popleft()[0]
        if done is not None:
            self.on_delivered(done)

    def ack(self, msg: Any) -> None:
        """Ack a received message (anything with ``mid`` and ``qos``)."""
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    @property
    def all_acked(self) -> bool:
        return self.acked >= self.issued

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged everything published so far (QoS1), while connected."""
        deadline = time.monotonic() + timeout
        with self._outstanding_cond:
            while self.acked < self.issued:
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected:
                    return False
                self._outstanding_cond.wait(min(left, 0.1))
        return True

    # ------------------------------------------------------------------ connection failures
    def connect_failed(self, exc: BaseException | None) -> None:
        """A connection attempt raised ``exc`` (paho's ``on_connect_fail``; the intake child calls it
        for its own ``reconnect()``)."""
        self._report(
            logging.ERROR if isinstance(exc, ssl.SSLError) else logging.WARNING,
            describe_connect_error(exc, self.settings),
        )

    def _report(self, level: int, problem: str) -> None:
        """Log a connection failure once: again only when it differs from the last one logged."""
        if problem == self._problem or self._stopping:
            return
        self._problem = problem
        log.log(level, "MQTT %s:%s: %s%s", self._host, self._port, problem, RETRYING)

    def _handle_pre_connect(self, client: paho.Client, userdata: object) -> None:
        self._connack = False

    def _handle_connect_fail(self, client: paho.Client, userdata: object) -> None:
        # paho calls this inside its ``except OSError`` around the attempt without passing the
        # exception: the one being handled is it.
        self.connect_failed(sys.exc_info()[1])

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _handle_connect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, properties: object = None
    ) -> None:
        self._connack = True
        if getattr(rc, "is_failure", False):
            hint = ""
            if getattr(rc, "value", None) in CREDENTIAL_REFUSALS:
                hint = (
                    " (check the user name and password)" if self.client.username else " (no user name set)"
                )
            self._report(logging.ERROR, f"broker refused the connection: {rc}{hint}")
            return
        # Ready only once the broker confirms the subscription (SUBACK): a reading published before
        # that would find no subscriber on a new session and be dropped by the broker.
        _, self._subscribe_mid = client.subscribe(self.settings.topic_readings, qos=self.settings.qos)
        with self._outstanding_cond:
            # paho resends what was in flight when the connection dropped, but 2.2 can strand some of
            # it (measured: docs/durability.md): counted as delivered from here, a lost connection
            # can lose outcomes (as with any paho client) but never stalls the service's delivery.
            self.acked = max(self.acked, self._issued_at_loss)
        self.publish(self.status_topic, b"online", qos=1, retain=True)

    def _handle_subscribe(
        self, client: paho.Client, userdata: object, mid: int, codes: list[Any], properties: object = None
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(getattr(c, "is_failure", False) for c in codes):
            log.error("MQTT subscription to %r refused: %s", self.settings.topic_readings, codes)
            return
        reconnect = self._ever_connected
        self._ever_connected = True
        self._problem = None
        self._connected.set()
        log.info(
            "MQTT connected to %s:%s (%s)", self._host, self._port, "reconnect" if reconnect else "first"
        )
        self._on_change(True, reconnect)

    def _handle_disconnect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, properties: object = None
    ) -> None:
        with self._outstanding_cond:
            self._issued_at_loss = self.issued
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.warning("MQTT disconnected (%s)%s", rc, "" if self._stopping else "; reconnecting")
            self._on_change(False, False)
        elif not self._connack:
            # Closed before any CONNACK: the broker dropped us at the TLS level (with mutual TLS the
            # client certificate is checked after the handshake, at our first read) or the listener
            # speaks something else; paho says no more than "connection lost".
            if not self.settings.broker()["tls"]:
                hint = "is it a TLS listener (mqtts://)?"
            elif self.settings.mqtt_cert_file is None:
                hint = "does it require a client certificate (SENSORWATCH_MQTT_CERT_FILE)?"
            else:
                hint = f"does it accept the client certificate {self.settings.mqtt_cert_file}?"
            self._report(logging.ERROR, f"broker closed the connection before answering CONNECT ({hint})")

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        faults.raise_point("mqtt.message")
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # paho raises on a topic that is not UTF-8
            topic = msg._topic.decode("utf-8", errors="replace")
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        self._on_message(InboundMessage(topic, payload, msg.qos, msg.mid, bool(msg.retain), bool(msg.dup)))

    @property
    def alive(self) -> bool:
        """paho's network thread is running (our callbacks never raise into it)."""
        thread = getattr(self.client, "_thread", None)
        return thread is not None and thread.is_alive()


class MqttPublisher:
    """A plain publishing client (the simulator / load generator): connect, publish, flush, close."""

    def __init__(self, url: str, client_id: str = "", qos: int = 1) -> None:
        from urllib.parse import unquote, urlsplit

        u = urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"broker URL must be mqtt://host[:port] or mqtts://…, got {url!r}")
        self.qos = qos
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if u.username:
            self.client.username_pw_set(unquote(u.username), unquote(u.password) if u.password else None)
        if u.scheme == "mqtts":
            self.client.tls_set()
        self.client.max_inflight_messages_set(1000)
        self.client.connect(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883))
        self.client.loop_start()
        self._last: paho.MQTTMessageInfo | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        self._last = self.client.publish(topic, payload, qos=self.qos)

    def flush(self, timeout: float = 30.0) -> None:
        if self._last is not None:
            self._last.wait_for_publish(timeout)

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
