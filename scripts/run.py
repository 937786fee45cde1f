"""`make run`: broker (when none is configured) + the service + a simulated fleet, until Ctrl-C.

Broker: $SENSORWATCH_MQTT_URL when set; else one already answering on 127.0.0.1:1883 (reused);
else Mosquitto started here when installed; else the embedded Python broker amqtt (installed into
.venv on first use). Set DEMO_SECONDS to stop by itself.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PORT = int(os.environ.get("SENSORWATCH_PORT", "8000"))
#: Readings per simulated device before anomalies are injected: just past the 64-reading warm-up
#: (32 s at 2 readings/s), so a newcomer sees events within the first minute.
INJECT_AFTER = 70
#: Anomaly events printed here as they arrive, then only the subscription line above says where.
FIRST_EVENTS = 5


def print_first_events(url: str, started: float) -> object:
    """A subscriber that prints the first FIRST_EVENTS anomaly events (kind, device, value against
    the prediction) with the seconds since the fleet started; returns the client (stopped on exit)."""
    import json

    import paho.mqtt.client as paho

    seen = [0]

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if seen[0] >= FIRST_EVENTS:
            return
        seen[0] += 1
        try:
            ev = json.loads(msg.payload)
            value = next(iter((ev.get("value") or {}).values()), None)
            pred = next(iter((ev.get("predicted") or {}).values()), None)
            what = "episode ended" if ev.get("episode") == "end" else f"value {value} (predicted {pred})"
            severity = f" ({ev['severity']})" if ev.get("severity") else ""
            line = f"{ev.get('kind')}{severity} on {ev.get('device_id')}: {what}"
        except (ValueError, TypeError, AttributeError):
            line = msg.payload[:200].decode(errors="replace")
        print(f"  [{time.monotonic() - started:5.1f} s] anomaly {seen[0]}/{FIRST_EVENTS}: {line}", flush=True)
        if seen[0] == FIRST_EVENTS:
            print("  (more: mosquitto_sub -t 'sensorwatch/anomalies/#' -v)", flush=True)

    return subscribe_anomalies(url, on_message, "sensorwatch-demo", qos=0)


def subscribe_anomalies(url: str, on_message: Callable[..., None], name: str, qos: int) -> Any:
    """A started paho client subscribed to ``sensorwatch/anomalies/#`` calling ``on_message``."""
    from urllib.parse import urlsplit

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    u = urlsplit(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{secrets.token_hex(3)}")
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe("sensorwatch/anomalies/#", qos=qos)
    client.connect(u.hostname or "127.0.0.1", u.port or 1883)
    client.loop_start()
    return client


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(procs: list[subprocess.Popen[bytes]]) -> str:
    if os.environ.get("SENSORWATCH_MQTT_URL"):
        return os.environ["SENSORWATCH_MQTT_URL"]
    if answers("127.0.0.1", 1883):
        print("broker: reusing the one answering on 127.0.0.1:1883")
        return "mqtt://127.0.0.1:1883"
    port = 1883
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if mosquitto:
        print(f"broker: starting Mosquitto on 127.0.0.1:{port}")
        procs.append(subprocess.Popen([mosquitto, "-p", str(port)]))
    else:
        print("broker: Mosquitto not installed; starting the embedded Python broker amqtt")
        if not (BIN / "amqtt").exists():
            subprocess.run([str(BIN / "pip"), "install", "-q", "amqtt"], check=True)
        cfg = ROOT / "out" / "amqtt.yaml"
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\nplugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        procs.append(subprocess.Popen([str(BIN / "amqtt"), "-c", str(cfg)]))
    for _ in range(100):
        if answers("127.0.0.1", port):
            return f"mqtt://127.0.0.1:{port}"
        time.sleep(0.1)
    raise SystemExit("broker did not start")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    procs: list[subprocess.Popen[bytes]] = []
    # SIGTERM (a supervisor, `kill`) and SIGINT (Ctrl-C; also when started in the background, where
    # SIGINT is ignored by default) both stop everything gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        url = start_broker(procs)
        token = os.environ.get("SENSORWATCH_ADMIN_TOKEN") or secrets.token_urlsafe(16)
        env = {**os.environ, "SENSORWATCH_MQTT_URL": url, "SENSORWATCH_ADMIN_TOKEN": token}
        env.setdefault("SENSORWATCH_STATE_DIR", str(ROOT / "state"))
        server = subprocess.Popen([str(BIN / "sensorwatch"), "serve", "--port", str(PORT)], env=env)
        procs.append(server)
        base = f"http://127.0.0.1:{PORT}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit("the service exited; see its log above")
            time.sleep(0.2)
        devices = os.environ.get("DEMO_DEVICES", "300")
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "sensorwatch"),
                    "simulate",
                    "--mqtt-url",
                    url,
                    "--devices",
                    devices,
                    "--rate",
                    "2",
                    "--anomaly-rate",
                    "0.002",
                    "--inject-after",
                    str(INJECT_AFTER),
                ]
            )
        )
        host = url.split("//")[1].split(":")[0]
        print(
            f"""
sensorwatch is running — {devices} simulated devices publish 2 readings/s each (warm-up: ~32 s;
anomalies are injected from ~35 s on; the first few events are printed below as they arrive).
  API docs      {base}/docs
  metrics       {base}/metrics
  ready         {base}/readyz
  anomalies     mosquitto_sub -h {host} -t 'sensorwatch/anomalies/#' -v
  dead letters  mosquitto_sub -h {host} -t 'sensorwatch/deadletter' -v
  admin token   {token}   (e.g. curl -H 'Authorization: Bearer {token}' -X DELETE {base}/v1/devices/sim-00001)
Ctrl-C stops everything (the service drains, snapshots its state to {env["SENSORWATCH_STATE_DIR"]}).
""",
            flush=True,
        )
        t0 = time.monotonic()
        try:
            watcher = print_first_events(url, t0)
        except OSError as exc:  # the demo goes on without the printout
            print(f"(not printing the first anomaly events: {exc})", flush=True)
            watcher = None
        deadline = float(os.environ.get("DEMO_SECONDS", "inf"))
        while time.monotonic() - t0 < deadline and server.poll() is None:
            time.sleep(0.5)
        if watcher is not None:
            watcher.loop_stop()  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
