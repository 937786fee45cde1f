"""Measurement prototype, not product code: MQTT intake in a child process, the engine in this one.

The child runs the paho client (manual acks), parses each message with orjson and sends the parsed
readings here in chunks (250 messages or 2 ms); this process applies them through the service's
``Engine`` with ``WAL_SYNC=fsync``, waits for durability and sends the message ids back for the
child to ack. No outcomes are published (a drain with scores off publishes nothing anyway). Drains N
one-reading messages queued in a private Mosquitto; compare with ``scripts/service_thread_cpu.py``
(the service as it is: paho and the scorer share one GIL) and with a bare paho consumer
(docs/durability.md)::

    .venv/bin/python scripts/intake_process_prototype.py [--messages 30000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TOPIC = "t/+/readings"


def connect_props() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    return props


def child(port: int, out: Connection, acks: Connection, ready: Any) -> None:
    import orjson
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="proto", protocol=paho.MQTTv5, manual_ack=True
    )
    buf: list[tuple[str, Any, Any, int]] = []
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            if buf:
                out.send(list(buf))
                buf.clear()

    def on_message(c: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        doc = orjson.loads(m.payload)
        with lock:
            buf.append((m.topic.split("/")[1], doc["ts"], doc["values"], m.mid))
            full = len(buf) >= 250
        if full:
            flush()

    def ticker() -> None:
        while True:
            time.sleep(0.002)
            flush()

    client.on_message = on_message
    client.connect("127.0.0.1", port, clean_start=False, properties=connect_props())
    client.loop_start()
    threading.Thread(target=ticker, daemon=True).start()
    ready.set()
    while (mids := acks.recv()) is not None:
        for mid in mids:
            client.ack(mid, 1)
    client.loop_stop()


def main() -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from service_thread_cpu import queue_messages

    from sensorwatch.state.records import MessageMeta
    from service.engine import Engine
    from service.metrics import Metrics
    from service.settings import load_settings
    from tests.e2e.harness import Broker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=30_000)
    n = ap.parse_args().messages
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        try:
            session = paho.Client(CallbackAPIVersion.VERSION2, client_id="proto", protocol=paho.MQTTv5)
            session.connect(broker.host, broker.port, clean_start=True, properties=connect_props())
            session.loop_start()
            time.sleep(0.2)
            session.subscribe(TOPIC, qos=1)
            time.sleep(0.3)
            session.disconnect()
            session.loop_stop()
            queue_messages(broker, n)
            settings = load_settings(mqtt_url="", state_dir=Path(tmp) / "state", wal_sync="fsync")
            engine = Engine(settings, Metrics(mqtt=False))
            engine.recover()
            ctx = mp.get_context("spawn")
            recv_out, send_out = ctx.Pipe(duplex=False)
            recv_acks, send_acks = ctx.Pipe(duplex=False)
            ready = ctx.Event()
            proc = ctx.Process(target=child, args=(broker.port, send_out, recv_acks, ready), daemon=True)
            proc.start()
            ready.wait(60)
            started, cpu, done = time.perf_counter(), time.process_time(), 0
            meta = MessageMeta("mqtt", "t", b"", 1)
            while done < n:
                items = recv_out.recv()
                while recv_out.poll() and len(items) < 4000:
                    items += recv_out.recv()
                seq, _, _ = engine.apply(
                    [x[0] for x in items], [x[1] for x in items], [x[2] for x in items], [meta] * len(items)
                )
                engine.wait_durable(seq, 5)
                send_acks.send([x[3] for x in items])
                done += len(items)
            elapsed = time.perf_counter() - started
            print(
                f"{n} readings in {elapsed:.2f} s = {n / elapsed:,.0f} r/s; this process "
                f"{(time.process_time() - cpu) / n * 1e6:.1f} µs CPU per reading"
            )
            send_acks.send(None)
            proc.join(5)
            engine.close()
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
