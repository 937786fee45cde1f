"""``sensorwatch bench wal``: the service's scoring path with the write-ahead log on and off, same run.

The path is the service's own — :class:`MicroBatcher` → :meth:`Engine.apply` (log append, scorer
step) → :class:`OutputStage` (waits for the record to be durable, then releases) — fed in-process
with messages already parsed (no broker, no MQTT client, no JSON), so the figure is what durability
costs the engine path and nothing else. A batch holds at most what the broker's in-flight window
lets the service hold (RECEIVE_MAXIMUM messages), as in the service; the whole backlog is queued at
once, so the path runs saturated. For each workload (one reading per message; 50-reading
gateway messages) and each trial the modes run back to back in the order ``off``, ``none``,
``fsync``, each on a fresh state directory; readings/s is the median over trials and the ratio is
taken against ``off`` of the same trial.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from sensorwatch.state.records import MessageMeta
from service.engine import Engine
from service.metrics import Metrics
from service.mqtt import RECEIVE_MAXIMUM
from service.pipeline import MicroBatcher, OutputStage, Work
from service.settings import load_settings

MODES = ("off", "none", "fsync")
T0 = 1_767_225_600.0


def make_work(devices: int, messages: int, per_message: int, done: Any) -> list[Work]:
    rng = np.random.default_rng(0)
    out, k = [], 0
    for m in range(messages):
        d = f"dev-{m % devices}"
        step = m // devices
        ts = [T0 + 60.0 * (step * per_message + i) for i in range(per_message)]
        vals = [[float(20 + np.sin(k + i) + rng.normal(0, 0.1))] for i in range(per_message)]
        k += per_message
        meta = MessageMeta("mqtt", f"sensors/{d}/readings", rng.bytes(16), per_message)
        out.append(Work([d] * per_message, ts, vals, "mqtt", done, meta))
    return out


def one(mode: str, model: str | None, devices: int, messages: int, per_message: int) -> float:
    """Readings/s of one pass through the path in ``mode``."""
    with tempfile.TemporaryDirectory(prefix="sw-bench-wal-") as tmp:
        params: dict[str, Any] = {"mqtt_url": "", "state_dir": Path(tmp), "wal_sync": mode}
        if model:
            params["model"] = model
        settings = load_settings(**params)
        engine = Engine(settings, Metrics(mqtt=False))
        engine.recover()
        outputs = OutputStage(engine)
        batcher = MicroBatcher(
            engine,
            engine.metrics,
            outputs,
            max_batch=min(settings.max_batch, RECEIVE_MAXIMUM * per_message),
            max_wait_ms=5,
            max_queue=10**9,
            min_batch=1,  # saturated: a batch takes whatever is queued
        )
        finished = threading.Event()
        left = [messages]

        def done(*_: Any) -> None:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

        work = make_work(devices, messages, per_message, done)
        outputs.start()
        batcher.start()
        start = time.perf_counter()
        for w in work:
            batcher.submit(w)
        if not finished.wait(600):
            raise RuntimeError(f"{mode}: not every message released")
        elapsed = time.perf_counter() - start
        batcher.close()
        outputs.close()
        engine.close()
    return messages * per_message / elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    workloads = {
        "one-reading": (args.devices, args.messages, 1),
        "gateway-50": (200, args.messages // 50, 50),
    }
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu": platform.processor()}}
    for name, (devices, messages, per) in workloads.items():
        trials: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.trials):
            for mode in MODES:
                trials[mode].append(one(mode, args.model, devices, messages, per))
        ratios = {
            m: statistics.median(a / b for a, b in zip(trials[m], trials["off"], strict=True)) for m in MODES
        }
        report[name] = {
            "devices": devices,
            "readings": messages * per,
            "readings_per_s": {m: statistics.median(v) for m, v in trials.items()},
            "ratio_to_off": ratios,
            "trials": trials,
        }
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'workload':<12} {'mode':<6} {'readings/s':>12} {'vs off':>7}   trials"]
    for name in ("one-reading", "gateway-50"):
        r = report[name]
        for m in MODES:
            runs = " ".join(f"{x:,.0f}" for x in r["trials"][m])
            lines.append(
                f"{name:<12} {m:<6} {r['readings_per_s'][m]:>12,.0f} {r['ratio_to_off'][m]:>7.3f}   {runs}"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
