"""Wall and CPU time of one ``Engine.apply`` by batch size: one reading per device over 1,000 devices,
shipped model, ``WAL_SYNC=fsync``, in-process, nothing else running. A measurement tool
(docs/durability.md)::

    .venv/bin/python scripts/apply_cost.py [SIZE ...]     # default 1 16 114 250 1000
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sensorwatch.state.records import MessageMeta
from service.engine import Engine
from service.metrics import Metrics
from service.settings import load_settings

DEVICES = 1000


def measure(n: int, warmup: int = 300, timed: int = 100) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            load_settings(mqtt_url="", state_dir=Path(tmp) / "st", wal_sync="fsync"), Metrics(mqtt=False)
        )
        engine.recover()
        meta = [MessageMeta("mqtt", "t/x/readings", b"0" * 16, 1)] * n
        step = 0

        def batch() -> tuple[list[str], list[float], list[Any], list[MessageMeta]]:
            nonlocal step
            step += 1
            ids = [f"d{(step * n + i) % DEVICES}" for i in range(n)]
            return ids, [1.7e9 + step * 60 + i * 1e-3 for i in range(n)], [[1.0]] * n, meta

        for _ in range(warmup):
            engine.apply(*batch())
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(timed):
            engine.apply(*batch())
        out = ((time.perf_counter() - wall) / timed * 1e3, (time.thread_time() - cpu) / timed * 1e3)
        engine.close()
        return out


if __name__ == "__main__":
    for size in [int(a) for a in sys.argv[1:]] or [1, 16, 114, 250, 1000]:
        wall_ms, cpu_ms = measure(size)
        print(
            f"batch {size:5d}: {wall_ms:6.2f} ms wall, {cpu_ms:6.2f} ms CPU per apply, "
            f"{cpu_ms / size * 1e3:7.1f} µs CPU per reading"
        )
