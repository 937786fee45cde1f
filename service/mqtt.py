"""The MQTT adapter — the only module that imports paho-mqtt.

The rest of the service sees :class:`InboundMessage` (a frozen dataclass) and four calls: ``start``,
``publish``, ``ack`` and ``stop``. paho runs its network loop in its own thread and reconnects by
itself (backoff 1 s → 30 s); on every (re)connect the adapter subscribes again and republishes the
retained ``online`` status. The session is persistent (stable client id, ``clean_start=False``, a
session expiry), messages are acked manually — only once every reading in them has an outcome — so
QoS1 readings published while the service is away or restarting are delivered afterwards.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from service.settings import Settings

log = logging.getLogger("sensorwatch.mqtt")

#: How many unacked QoS1 messages the broker may have in flight to us (MQTT 5 Receive Maximum).
RECEIVE_MAXIMUM = 1000


@dataclass(frozen=True)
class InboundMessage:
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
        self._pending: deque[paho.MQTTMessageInfo] = deque()
        self._pending_lock = threading.Lock()
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
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)  # outgoing: unbounded in paho, bounded by our batches
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self._host, self._port = b["host"], b["port"]

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        props = None
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
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` (retained), flush, disconnect cleanly (the session is kept)."""
        self._stopping = True
        if self.connected:
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish offline status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------------ I/O
    def publish(self, topic: str, payload: bytes, qos: int | None = None, retain: bool = False) -> None:
        info = self.client.publish(
            topic, payload, qos=self.settings.qos if qos is None else qos, retain=retain
        )
        with self._pending_lock:
            while self._pending and self._pending[0].is_published():
                self._pending.popleft()
            self._pending.append(info)

    def ack(self, msg: InboundMessage) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def flush(self, timeout: float) -> bool:
        """Wait until everything published so far is acknowledged by the broker (QoS1) or written."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            pending = list(self._pending)
        for info in pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self.connected:
                return False
            try:
                info.wait_for_publish(left)
            except (RuntimeError, ValueError):
                return False
        return True

    # ------------------------------------------------------------------ paho callbacks (network thread)
    def _handle_connect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, properties: object = None
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("MQTT connect refused: %s", rc)
            return
        client.subscribe(self.settings.topic_readings, qos=self.settings.qos)
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        reconnect = self._ever_connected
        self._ever_connected = True
        self._connected.set()
        log.info(
            "MQTT connected to %s:%s (%s)", self._host, self._port, "reconnect" if reconnect else "first"
        )
        self._on_change(True, reconnect)

    def _handle_disconnect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, properties: object = None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.warning("MQTT disconnected (%s)%s", rc, "" if self._stopping else "; reconnecting")
            self._on_change(False, False)

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
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
