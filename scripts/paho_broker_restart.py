"""Without sensorwatch: how many QoS1 messages a bare paho publisher → subscriber pair loses through a
graceful restart of a private Mosquitto (the limitation stated in README "Durability").

    .venv/bin/python scripts/paho_broker_restart.py [--inflight 1000] [--pause 0] [--runs 5]

Each run: a subscriber (persistent session, expiry 1 h) and a publisher (persistent session); 300
messages published, the broker stopped with SIGTERM (it writes its persistence file), 300 more
published while it is down, the broker started again on the same port, 300 more; then 5 s for the
rest to arrive. Prints how many of the 900 the subscriber received.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.e2e.harness import Broker


def client(client_id: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.reconnect_delay_set(1, 2)
    return c


def props() -> Properties:
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 3600
    p.ReceiveMaximum = 65535
    return p


def one_run(inflight: int, pause: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        got: set[bytes] = set()
        sub = client("sub")
        sub.on_message = lambda c, u, m: got.add(m.payload)
        sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("t/x", qos=1)
        sub.connect(broker.host, broker.port, properties=props())
        sub.loop_start()
        time.sleep(0.5)
        pub = client("pub")
        pub.max_inflight_messages_set(inflight)
        pub.max_queued_messages_set(0)
        pub.connect(broker.host, broker.port, clean_start=False, properties=props())
        pub.loop_start()
        time.sleep(0.3)
        for i in range(300):
            pub.publish("t/x", str(i).encode(), qos=1)
        time.sleep(pause)
        broker.stop()
        for i in range(300, 600):
            pub.publish("t/x", str(i).encode(), qos=1)
            time.sleep(0.001)
        broker.start()
        for i in range(600, 900):
            pub.publish("t/x", str(i).encode(), qos=1)
        time.sleep(5)
        for c in (pub, sub):
            c.loop_stop()
        broker.stop()
        return len(got)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inflight", type=int, default=1000, help="publisher's max_inflight_messages (0: none)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between the first 300 and the stop")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    counts = [one_run(args.inflight, args.pause) for _ in range(args.runs)]
    print(f"inflight {args.inflight}, pause {args.pause} s: received {counts} of 900")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
