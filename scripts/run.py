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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PORT = int(os.environ.get("SENSORWATCH_PORT", "8000"))


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
                ]
            )
        )
        host = url.split("//")[1].split(":")[0]
        print(
            f"""
sensorwatch is running — {devices} simulated devices publish 2 readings/s each (warm-up: ~32 s).
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
        deadline = float(os.environ.get("DEMO_SECONDS", "inf"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < deadline and server.poll() is None:
            time.sleep(0.5)
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
