"""Per-thread CPU of the service, in-process, while it drains N one-reading messages queued in a
private Mosquitto, and the wall and CPU time of every ``Engine.apply`` (docs/durability.md):

    .venv/bin/python scripts/service_thread_cpu.py [--messages 30000] [--per-message 1|50]
        [--switch-interval S] [KEY=VALUE ...]

KEY=VALUE are service settings (e.g. ``max_wait_ms=20``). A measurement tool, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.bench_e2e import stat_cpu_s
from service.runtime import Service
from service.settings import Settings, load_settings
from tests.e2e.harness import Broker


def thread_cpu(child: int | None = None) -> dict[str, float]:
    """utime + stime of every Python thread of this process, and of every thread of the intake
    process ``child`` (named ``intake:<tid>``), in seconds."""
    out = {t.name: stat_cpu_s(Path(f"/proc/self/task/{t.native_id}/stat")) for t in threading.enumerate()}
    for path in Path(f"/proc/{child}/task").glob("*/stat") if child else ():
        out[f"intake:{path.parent.name}"] = stat_cpu_s(path)
    return out


def queue_messages(broker: Broker, n: int, per: int = 1) -> None:
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.max_inflight_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    infos = []
    devices = 1000 if per == 1 else 200
    for i in range(n):
        t = 1767225600 + 60 * per * (i // devices)
        rows = [f'{{"ts": {t + 60 * k}, "values": [{20 + ((i + k) % 7) * 0.1:.3f}]}}' for k in range(per)]
        doc = rows[0] if per == 1 else '{"readings": [' + ", ".join(rows) + "]}"
        infos.append(pub.publish(f"t/dev-{i % devices}/readings", doc.encode(), qos=1))
    for info in infos:
        info.wait_for_publish(60)
    pub.loop_stop()


def scored(svc: Service) -> float:
    return sum(
        s.value
        for m in svc.metrics.registry.collect()
        if m.name == "sensorwatch_readings"
        for s in m.samples
        if s.name.endswith("_total")
    )


def drain(settings: Settings, n: int) -> tuple[float, dict[str, float], list[tuple[float, float]]]:
    svc = Service(settings)
    applies: list[tuple[float, float]] = []
    apply = svc.engine.apply

    def timed(*args: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        out = apply(*args)
        applies.append((time.perf_counter() - wall, time.thread_time() - cpu))
        return out

    svc.engine.apply = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    svc.start()
    proc = getattr(svc.mqtt, "_proc", None)
    child = proc.pid if proc is not None else None
    before = thread_cpu(child)
    while scored(svc) < n:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    after = thread_cpu(child)
    svc.stop()
    return elapsed, {k: after[k] - before.get(k, 0.0) for k in after}, applies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval to try")
    ap.add_argument("--per-message", type=int, default=1, help="readings per message (>1: 200 devices)")
    ap.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    extra = dict(s.split("=", 1) for s in args.settings)
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.conf.write_text(
            broker.conf.read_text().replace("max_queued_messages 100000", "max_queued_messages 1000000")
        )
        broker.start()
        try:
            settings = load_settings(
                mqtt_url=broker.url,
                mqtt_client_id="tc",
                topic_readings="t/+/readings",
                state_dir=Path(tmp) / "state",
                admin_token="x" * 20,
                **extra,
            )
            first = Service(settings)  # creates the persistent session, then goes away
            first.start()
            while not first.ready:
                time.sleep(0.05)
            first.stop()
            queue_messages(broker, args.messages, args.per_message)
            if args.switch_interval:
                sys.setswitchinterval(args.switch_interval)
            elapsed, cpu, applies = drain(settings, args.messages * args.per_message)
        finally:
            broker.stop()
    n = args.messages * args.per_message
    print(f"{n} readings in {elapsed:.2f} s = {n / elapsed:,.0f} r/s")
    for name, s in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28} {s / n * 1e6:6.1f} µs CPU per reading")
    walls = sorted(w for w, _ in applies)
    print(
        f"Engine.apply: {len(applies)} calls ({n / max(len(applies), 1):,.0f} readings each), wall ms "
        f"p50 {1e3 * walls[len(walls) // 2]:.1f} max {1e3 * walls[-1]:.1f}, "
        f"CPU {1e3 * sum(c for _, c in applies):,.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
