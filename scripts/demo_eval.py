"""`make run`'s first minutes, measured against the simulator's own labels (issue #12's Must-show).

    .venv/bin/python scripts/demo_eval.py [--minutes 10] [--devices 300] [--json out/demo-eval.json]

Runs what `make run` runs — the service (default settings, a fresh state directory, a free port)
and the simulated fleet (2 readings/s per device, anomalies from each device's 70th reading,
``--labels``) — against the broker on $SENSORWATCH_MQTT_URL or 127.0.0.1:1883, subscribes to
``sensorwatch/anomalies/#`` and reports:

* seconds from the service being ready to the first anomaly event;
* events inside an injected episode (its readings, and 5 readings after) and outside it, and false
  events per 1,000 normal readings (readings published minus labelled ones);
* events per injected episode (over the episodes that raised any, and over all) and episodes
  caught, per kind; episode-end notices are counted apart (they are not events).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BIN, INJECT_AFTER, free_port, subscribe_anomalies

RATE = 2.0
AFTER = 5  # readings after an injected episode in which an event still counts for it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    url = os.environ.get("SENSORWATCH_MQTT_URL", "mqtt://127.0.0.1:1883")
    events: list[dict[str, Any]] = []
    ends = [0]
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as state:
        port = free_port()
        env = {
            **os.environ,
            "SENSORWATCH_MQTT_URL": url,
            "SENSORWATCH_ADMIN_TOKEN": secrets.token_urlsafe(16),
            "SENSORWATCH_STATE_DIR": state,
        }
        server = subprocess.Popen(
            [str(BIN / "sensorwatch"), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sim = None
        try:
            ready = wait_ready(port, server)
            client = subscribe(url, events, ends, lock, ready)
            labels_path = Path(state) / "labels.jsonl"
            with open(labels_path, "w") as labels_out:
                sim = subprocess.Popen(
                    [
                        str(BIN / "sensorwatch"),
                        "simulate",
                        "--mqtt-url",
                        url,
                        "--devices",
                        str(args.devices),
                        "--rate",
                        str(RATE),
                        "--anomaly-rate",
                        "0.002",
                        "--inject-after",
                        str(INJECT_AFTER),
                        "--labels",
                        "--duration",
                        str(60 * args.minutes),
                    ],
                    stdout=labels_out,
                    stderr=subprocess.DEVNULL,
                )
                sim.wait(60 * args.minutes + 60)
            time.sleep(3.0)  # the last readings' events
            client.loop_stop()
            labels = [json.loads(line) for line in labels_path.read_text().splitlines() if line.strip()]
        finally:
            for p in (sim, server):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(60)
    report = evaluate(events, ends[0], labels, args.devices, args.minutes)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def wait_ready(port: int, server: subprocess.Popen[bytes]) -> float:
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit("the service exited")
        time.sleep(0.2)
    raise SystemExit("the service did not become ready")


def subscribe(
    url: str, events: list[dict[str, Any]], ends: list[int], lock: threading.Lock, t0: float
) -> Any:
    import paho.mqtt.client as paho

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        ev = json.loads(msg.payload)
        with lock:
            if ev.get("episode") == "end":
                ends[0] += 1
            else:
                events.append({"at": time.monotonic() - t0, **ev})

    return subscribe_anomalies(url, on_message, "demo-eval", qos=1)


def evaluate(
    events: list[dict[str, Any]], ends: int, labels: list[dict[str, Any]], devices: int, minutes: float
) -> dict[str, Any]:
    # Injected episodes: consecutive labelled readings of a device with the same label.
    episodes: dict[str, list[list[Any]]] = defaultdict(list)  # device → [[label, first ts, last ts]]
    step = 1.0 / RATE
    for lab in sorted(labels, key=lambda r: (r["device_id"], r["ts"])):
        eps = episodes[lab["device_id"]]
        if eps and eps[-1][0] == lab["label"] and lab["ts"] - eps[-1][2] <= 1.5 * 1.2 * step:
            eps[-1][2] = lab["ts"]
        else:
            eps.append([lab["label"], lab["ts"], lab["ts"]])
    hits: dict[tuple[str, int], int] = defaultdict(int)
    true_ev = false_ev = 0
    false_kinds: dict[str, int] = defaultdict(int)
    for ev in events:
        found = None
        for k, (_, first, last) in enumerate(episodes.get(ev["device_id"], [])):
            if first - 1e-6 <= ev["ts"] <= last + AFTER * 1.2 * step:
                found = k
                break
        if found is None:
            false_ev += 1
            false_kinds[ev.get("kind") or "?"] += 1
        else:
            true_ev += 1
            hits[(ev["device_id"], found)] += 1
    readings = int(devices * RATE * 60 * minutes)
    normal = readings - len(labels)
    n_episodes = sum(len(v) for v in episodes.values())
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for dev, eps in episodes.items():
        for k, (label, _, _) in enumerate(eps):
            per_kind[label][1] += 1
            per_kind[label][0] += int(hits.get((dev, k), 0) > 0)
    caught = sum(1 for v in hits.values() if v)
    return {
        "minutes": minutes,
        "devices": devices,
        "readings_published": readings,
        "labelled_readings": len(labels),
        "first_event_s_after_ready": round(min((e["at"] for e in events), default=float("nan")), 1),
        "events": len(events),
        "episode_end_notices": ends,
        "events_in_injected_episodes": true_ev,
        "false_events": false_ev,
        "false_events_by_kind": dict(false_kinds),
        "false_events_per_1k_normal_readings": round(1000.0 * false_ev / max(normal, 1), 3),
        "injected_episodes": n_episodes,
        "episodes_caught": caught,
        "events_per_caught_episode": round(true_ev / max(caught, 1), 2),
        "events_per_injected_episode": round(true_ev / max(n_episodes, 1), 2),
        "caught_by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(per_kind.items())},
    }


if __name__ == "__main__":
    sys.exit(main())
