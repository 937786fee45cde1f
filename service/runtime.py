"""The running service: engine + micro-batcher + output stage + MQTT adapter + snapshots, and their
order of start and stop."""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sensorwatch import faults
from sensorwatch.scoring.batch import StepResult
from sensorwatch.state.records import MessageMeta
from service.engine import REDELIVERY_WINDOW, Engine, Recovery
from service.intake import IntakeProcess, ParsedMessage, Parser, decode_chunk, encode_chunk
from service.metrics import Metrics
from service.mqtt import RECEIVE_MAXIMUM, MqttAdapter
from service.outcomes import Outcomes
from service.pipeline import MicroBatcher, OutputStage, QueueFull, Work
from service.settings import Settings

log = logging.getLogger("sensorwatch.service")

#: A batch goes as soon as this many readings are queued (else after MAX_WAIT_MS): a scorer step has
#: a fixed cost of ~1 ms, so tiny batches starve throughput, while the broker's in-flight window
#: (RECEIVE_MAXIMUM messages, acked only once scored) caps how many can ever be queued.
MIN_BATCH = RECEIVE_MAXIMUM // 4
MIN_BATCH_311 = 16

#: The interpreter's GIL switch interval in the service (Python's default: 5 ms). The scorer's step
#: holds the GIL between torch ops; every time an I/O thread (MQTT intake, output stage, log writer)
#: wakes it waits up to one interval for the GIL, several times per batch. Measured with live
#: one-reading messages at 300/s and every score published: publish → score p50 58 → 23 ms,
#: p99 119 → 47 ms at 0.5 ms (docs/durability.md).
GIL_SWITCH_S = 0.0005

#: The watchdog looks this often whether the service can still score (a thread may have died).
WATCHDOG_INTERVAL_S = 0.5
#: How long a failed service stands (``/readyz`` 503, ``sensorwatch_ready`` 0, scrapable) before it
#: exits with :data:`EXIT_FAILED`.
WATCHDOG_EXIT_AFTER_S = 3.0
#: The exit status of a service that stopped because it could no longer score (EX_SOFTWARE).
EXIT_FAILED = 70

#: How long after start a message may still be recognised as a redelivery of one applied before a
#: crash (the broker resends its in-flight messages first thing after we reconnect).
REDELIVERY_WINDOW_S = 300.0


def freeze_heap() -> None:
    """Move every object alive now (modules, torch, numba's compiled kernels, the recovered state:
    ~300,000 objects) out of the garbage collector's sight. Without it each collection the cyclic
    GC runs while intake builds its per-message objects traverses them all: measured with 50-reading
    gateway messages, unpickling a chunk from the intake process took 100 µs of CPU per message in
    the service against 5 µs in a bare interpreter, and the service drained 0.6× as fast
    (docs/durability.md). Objects created later are collected as usual; nothing frozen is freed,
    which is what long-lived start-up objects are anyway."""
    gc.collect()
    gc.freeze()


def _nothing() -> None:
    """The release of a record with no outcomes (a device reset, a model swap)."""


class RecentDigests:
    """The last ``maxlen`` message digests, with O(1) membership."""

    def __init__(self, maxlen: int) -> None:
        self._order: deque[bytes] = deque()
        self._set: set[bytes] = set()
        self.maxlen = maxlen

    def add(self, digest: bytes) -> None:
        if digest in self._set:
            return
        self._order.append(digest)
        self._set.add(digest)
        if len(self._order) > self.maxlen:
            self._set.discard(self._order.popleft())

    def __contains__(self, digest: object) -> bool:
        return digest in self._set

    def items(self) -> list[bytes]:
        """Oldest first."""
        return list(self._order)


class Service:
    """Wires the doors (MQTT, REST) to the one scoring path and the outputs (see :meth:`stop`)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        #: What the watchdog does once the service cannot score (``sensorwatch serve``: exit the
        #: process, see :meth:`_watch`); None: report it only (/readyz, the metric, the log).
        self.on_fatal = on_fatal
        self._thread_death: str | None = None
        self._previous_hook: Callable[[threading.ExceptHookArgs], Any] | None = None
        self._stop_watch = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="sensorwatch-watchdog", daemon=True)
        self.metrics = metrics or Metrics(mqtt=bool(settings.mqtt_url))
        self.engine = Engine(settings, self.metrics)
        self.outputs = OutputStage(self.engine)
        self.engine.on_plain_record = lambda seq: self.outputs.put(seq, _nothing)
        self.batcher = MicroBatcher(
            self.engine,
            self.metrics,
            self.outputs,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            # MQTT 3.1.1 has no Receive Maximum: the broker's max_inflight_messages (Mosquitto: 20 by
            # default) caps what can be queued, so a batch goes at a size below it.
            min_batch=MIN_BATCH if settings.mqtt_protocol == "5" else MIN_BATCH_311,
        )
        self.metrics.watch_engine(self.engine, self.batcher, self.outputs)
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)  # read at scrape time
        self.mqtt: MqttAdapter | IntakeProcess | None = None
        if settings.mqtt_url and settings.mqtt_intake == "process":
            self.mqtt = IntakeProcess(settings, self._on_mqtt_messages, self._on_mqtt_change)
        elif settings.mqtt_url:
            parse = Parser(settings)
            self.mqtt = MqttAdapter(
                settings,
                lambda msg: self._on_mqtt_messages(decode_chunk(encode_chunk([parse(msg)]))),
                self._on_mqtt_change,
            )
        if self.mqtt is not None:
            # A batch's outcomes are handed to paho, then its record is marked; it counts as released
            # (for the "done" marks and for snapshots) once the broker acknowledged them (see mark).
            self.outputs.on_released = self.mqtt.mark
            self.mqtt.on_delivered = self.engine.mark_released
        self._intake_open = False
        self._redeliveries: set[bytes] = set()
        self._seen = RecentDigests(REDELIVERY_WINDOW)  # messages taken in lately (queued or applied)
        self._redeliveries_until = 0.0
        self._stop_snapshots = threading.Event()
        self._snapshotter = threading.Thread(
            target=self._snapshot_loop, name="sensorwatch-snapshots", daemon=True
        )
        self.out = Outcomes(settings, self._publish)
        self.recovery: Recovery | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Recover (snapshot + log replay, before any door opens), then open the doors."""
        sys.setswitchinterval(GIL_SWITCH_S)
        self.recovery = r = self.engine.recover()
        if r.restored_devices or r.replayed_records:
            log.info(
                "restored state of %d devices from the snapshot (record %d) and replayed %d log records "
                "(%d readings) in %.2f s; %d batches' outputs published again",
                r.restored_devices,
                r.snapshot_seq,
                r.replayed_records,
                r.replayed_readings,
                r.seconds,
                len(r.unpublished),
            )
        self.metrics.replayed_records.inc(r.replayed_records)
        self._redeliveries = self.engine.redelivery_digests()
        self._redeliveries_until = time.monotonic() + REDELIVERY_WINDOW_S
        self.engine.mark_released(r.released_through)
        freeze_heap()
        self.outputs.start()
        for item in r.unpublished:  # durable already: released first, in order
            self.outputs.put(item.seq, functools.partial(self._republish, item.record, item.result))
        self._hook_thread_deaths()
        self.batcher.start()
        self._intake_open = True
        if self.mqtt is not None:
            self.mqtt.start()
        if self.engine.snapshot_path() is not None:
            self._snapshotter.start()
        self._watchdog.start()

    def _hook_thread_deaths(self) -> None:
        """Note why a thread died (an exception escaped it: a bug, or an injected fault), for the
        watchdog's one log line; Python's own hook still prints the traceback."""
        previous = self._previous_hook = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread is not None else "a thread"
            if self._thread_death is None:
                self._thread_death = f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}"
            previous(args)

        threading.excepthook = hook

    def _watch(self) -> None:
        """The watchdog: every WATCHDOG_INTERVAL_S it looks whether a thread the service needs has
        died (:attr:`failure`). Once one has:

        1. ``/readyz`` answers 503 with the cause and ``sensorwatch_ready`` drops to 0 (and
           ``sensorwatch_mqtt_connected`` when it is the MQTT thread that died): both are read at
           request / scrape time, so a load balancer and Prometheus see it at once.
        2. The cause is logged once, as one CRITICAL line.
        3. After WATCHDOG_EXIT_AFTER_S (time for a scrape), ``on_fatal`` runs: ``sensorwatch serve``
           exits with status EXIT_FAILED so that its supervisor (systemd, Docker's restart policy,
           Kubernetes) restarts it. Restarting the thread in place is not done: a thread died of a
           bug, mid-way through work whose outcome is unknown, while a restart recovers the exact
           state from the snapshot and the log (the tested crash path), and the broker redelivers
           every message not acked.
        """
        while not self._stop_watch.wait(WATCHDOG_INTERVAL_S):
            failure = self.failure
            if failure is None:
                continue
            if "MQTT" in failure:
                self.metrics.mqtt_connected.set(0)
            action = (
                f"exiting with status {EXIT_FAILED} in {WATCHDOG_EXIT_AFTER_S:g} s for the supervisor "
                "to restart it (state is recovered from the snapshot and the log)"
                if self.on_fatal is not None
                else "not ready until restarted"
            )
            log.critical("sensorwatch cannot score: %s; %s", failure, action)
            if self._stop_watch.wait(WATCHDOG_EXIT_AFTER_S) or self.on_fatal is None:
                return
            self.on_fatal(failure)
            return

    @property
    def failure(self) -> str | None:
        """Why the service cannot score (a dead thread, a failed log), or None."""
        if self.outputs.failed:
            return self.outputs.failed
        if self._intake_open and not (self.batcher.alive and self.outputs.alive):
            return self._thread_death or "a scoring thread died"
        if self._intake_open and isinstance(self.mqtt, IntakeProcess) and not self.mqtt.alive:
            return self.mqtt.died or "the MQTT intake process exited"
        if self._intake_open and self.mqtt is not None and self.mqtt.connected and not self.mqtt.alive:
            return "the MQTT network thread died" + (f" ({self._thread_death})" if self._thread_death else "")
        return None

    @property
    def ready(self) -> bool:
        return self._intake_open and (self.mqtt is None or self.mqtt.connected) and self.failure is None

    def stop(self) -> None:
        """Graceful stop. Order matters:

        1. Close intake: later MQTT messages are not acked, so the broker keeps them in our persistent
           session and redelivers them after the restart (nothing acked is ever left unscored).
        2. Drain the micro-batcher (every queued reading is scored and logged), then the output stage
           (every result published and message acked once its record is durable).
        3. Flush: wait for the broker to acknowledge what we published (anomaly events are QoS1).
        4. Snapshot the state *after* the drain, so the restart continues exactly where we stopped
           (and the log it covers is deleted), then close the log.
        5. Disconnect cleanly, publishing the retained ``offline`` status first (a clean disconnect
           suppresses the last will).
        """
        self._intake_open = False
        self._stop_watch.set()
        if self._previous_hook is not None:
            threading.excepthook = self._previous_hook
        if not self.batcher.close(timeout=60):
            log.error("micro-batcher did not drain within 60 s")
        if not self.outputs.close(timeout=60):
            log.error("output stage did not drain within 60 s")
        delivered = self.mqtt is None or self.mqtt.flush(timeout=10)
        self._stop_snapshots.set()
        if not delivered and self.engine.wal is not None:
            # A snapshot now would be ahead of outcomes the broker never acknowledged; the log keeps
            # them, and the next start publishes them again.
            log.warning("outcomes not acknowledged by the broker; no snapshot (the log covers them)")
        elif self.outputs.failed is None:
            path = self.engine.snapshot()
            if path is not None:
                log.info("state of %d devices written to %s", len(self.engine.scorer.store), path)
        self.engine.close()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.metrics.mqtt_connected.set(0)

    def _snapshot_loop(self) -> None:
        """Periodic snapshots, and one as soon as the log has grown by ``WAL_SNAPSHOT_MB``."""
        interval = self.settings.snapshot_interval_s
        last = time.monotonic()
        while not self._stop_snapshots.is_set():
            wanted = self.engine.snapshot_wanted.wait(1.0)
            due = interval > 0 and time.monotonic() - last >= interval
            if self._stop_snapshots.is_set() or not (wanted or due):
                continue
            try:
                self.engine.snapshot()
            except Exception:
                log.exception("state snapshot failed")
            last = time.monotonic()

    # ------------------------------------------------------------------ MQTT door
    def _on_mqtt_change(self, connected: bool, reconnect: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected and reconnect:
            self.metrics.mqtt_reconnects.inc()

    def _on_mqtt_messages(self, messages: list[ParsedMessage]) -> None:
        """Parsed MQTT messages, in arrival order (from the intake process's receiver thread, or from
        paho's thread with ``MQTT_INTAKE=thread``): nothing may escape (it would stop all intake)."""
        if not self._intake_open:
            return  # not acked: redelivered from the persistent session after the restart
        works = []
        for msg in messages:
            try:
                works.append(self._mqtt_work(msg))
            except Exception as exc:  # a bug, not an input: still one outcome, and intake goes on
                log.exception("MQTT message on %r not queued", msg.topic[:200])
                works.append(self._rejected(msg, "internal_error", f"not queued: {exc}"))
        try:
            self.batcher.submit_many(works)  # blocking while full is the backpressure
        except QueueFull:
            return  # shutting down: the rest is not acked, and redelivered later

    def _mqtt_work(self, msg: ParsedMessage) -> Work:
        digest = msg.digest
        if self._is_redelivery(msg, digest):
            self.metrics.redeliveries.inc()
            meta = MessageMeta("mqtt", msg.topic, digest, 0)
            return Work([], [], [], "mqtt", functools.partial(self._ack_only, msg), meta)
        self._seen.add(digest)
        device = msg.device
        if msg.reason is not None or device is None:  # parsed readings always have a device
            return self._rejected(msg, msg.reason or "internal_error", msg.detail)
        n = len(msg.ts)
        meta = MessageMeta("mqtt", msg.topic, digest, n)
        return Work(
            [device] * n, msg.ts, msg.values, "mqtt", functools.partial(self._mqtt_done, msg, meta), meta
        )

    def _is_redelivery(self, msg: ParsedMessage, digest: bytes) -> bool:
        """A message the broker sends again that we already took in: flagged DUP (a retransmission
        after a lost connection: its ack never arrived) and seen recently, or — for a while after a
        crash — one the recovered log says was applied. It is acked (in order), not scored twice."""
        if digest in self._seen and msg.dup:
            return True
        if self._redeliveries and digest in self._redeliveries:
            if time.monotonic() < self._redeliveries_until:
                self._redeliveries.discard(digest)
                return True
            self._redeliveries = set()
        return False

    def _rejected(self, msg: ParsedMessage, reason: str, detail: str) -> Work:
        """A message refused whole: one dead letter, acked in its turn (after earlier messages)."""
        self.metrics.readings.labels("mqtt", "rejected").inc()
        self.metrics.rejections.labels(reason).inc()
        meta = MessageMeta("mqtt", msg.topic, msg.digest, 0, reason, detail)
        return Work([], [], [], "mqtt", functools.partial(self._reject_done, msg, meta, msg.device), meta)

    def _ack_only(self, msg: ParsedMessage, result: StepResult | None, start: int, stop: int) -> None:
        self._ack(msg)

    def _reject_done(self, msg: ParsedMessage, meta: MessageMeta, device: str | None, *_: Any) -> None:
        try:
            self.out.dead_letter(meta, msg.payload, device, replayed=False)
        finally:
            self._ack(msg)

    def _mqtt_done(
        self, msg: ParsedMessage, meta: MessageMeta, result: StepResult | None, start: int, stop: int
    ) -> None:
        """Runs on the output stage once the batch is durable: publish every outcome, then ack the
        message — always: an unacked message would hold one of the broker's in-flight slots for this
        session until a restart, and then be scored a second time."""
        try:
            self.out.publish(meta, msg.payload, result, start, stop, replayed=False)
            faults.point("outputs.after_publish")
        finally:
            self._ack(msg)

    def _republish(self, record: Any, result: StepResult | None) -> None:
        """Outputs of a batch replayed in recovery (published before the crash or not: ``replayed``)."""
        start = 0
        for meta in record.messages:
            if meta.source == "mqtt" and meta.reason is not None:
                self.out.dead_letter(meta, b"", None, replayed=True)
            elif meta.source == "mqtt":
                self.out.publish(meta, b"", result, start, start + meta.readings, replayed=True)
            start += meta.readings

    def _publish(self, topic: str, payload: bytes, key: str = "") -> None:
        if self.mqtt is not None:
            self.mqtt.publish(topic, payload)

    def _ack(self, msg: ParsedMessage) -> None:
        if self.mqtt is not None:
            self.mqtt.ack(msg)

    # ------------------------------------------------------------------ REST door
    def submit_rest(self, work: Work, timeout: float) -> None:
        if not self._intake_open:
            raise QueueFull("service is not accepting readings")
        self.batcher.submit(work, timeout=timeout)

    def reset_device(self, device_id: str) -> bool:
        """Forget a device; answers once the reset is durable."""
        known, seq = self.engine.reset(device_id)
        if known:
            self.engine.wait_durable(seq, 30.0)
        return known

    def health(self) -> dict[str, Any]:
        out = {
            "ready": self.ready,
            "mqtt_connected": None if self.mqtt is None else self.mqtt.connected,
            "model": self.engine.scorer.model_version,
            "queue_depth": self.batcher.depth,
            "devices": len(self.engine.scorer.store),
        }
        failure = self.failure
        if failure:
            out["failure"] = failure
        return out


def exit_process(failure: str) -> None:
    """``on_fatal`` of ``sensorwatch serve``: leave at once with :data:`EXIT_FAILED`. No graceful stop
    — the dead thread cannot drain — so it is a crash, which the log and the snapshot are built to
    survive exactly; logs are flushed first."""
    logging.shutdown()
    os._exit(EXIT_FAILED)
