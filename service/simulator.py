"""Publish a simulated fleet (:class:`sensorwatch.simulate.Fleet`) to MQTT — the ``make run`` demo
and a load generator. Labels of injected anomalies go to stdout as JSON lines when asked.

SIGTERM (``docker stop``, a supervisor) and SIGINT (Ctrl-C) stop it the same clean way (see
:func:`stop_on_signals`): the current tick ends, what was published is flushed, the client
disconnects and the process exits 0. A second signal during that stops it the hard way.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TextIO

import numpy as np

from sensorwatch.simulate import Fleet
from service.mqtt import MqttPublisher


def run(
    url: str,
    *,
    devices: int = 300,
    rate: float = 2.0,
    channels: int = 1,
    duration_s: float | None = None,
    seed: int = 0,
    anomaly_rate: float = 0.002,
    topic: str = "sensors/{device_id}/readings",
    labels_out: TextIO | None = None,
    channel_names: list[str] | None = None,
    stop: threading.Event | None = None,
    time_lapse: float = 1.0,
    start_ts: float | None = None,
    inject_after: int = 400,
) -> int:
    """Publish one reading per device every 1/``rate`` s until ``duration_s`` (or forever), or until
    ``stop`` is set (checked between ticks).

    Readings are stamped from ``start_ts`` (default: now) on, ``time_lapse`` simulated seconds per real
    second apart (default 1: wall-clock time, so a restarted simulator — or a service restored from a
    snapshot — stays in timestamp order; a larger factor shows daily cycles in minutes but runs the
    stamps ahead of the clock, and readings of a rerun within that lead are ``out_of_order``)."""
    stop = stop or threading.Event()
    fleet = Fleet(
        devices=devices,
        channels=channels,
        seed=seed,
        anomaly_rate=anomaly_rate,
        interval_s=time_lapse / rate,
        start_ts=time.time() if start_ts is None else start_ts,
        inject_after=inject_after,
    )
    pub = MqttPublisher(url, client_id=f"sensorwatch-sim-{seed}")
    sent, t0 = 0, time.monotonic()
    try:
        while not stop.is_set() and (duration_s is None or time.monotonic() - t0 < duration_s):
            tick = time.monotonic()
            ids, ts, values, labels = fleet.step()
            for i, device in enumerate(ids):
                vals = [None if np.isnan(v) else round(float(v), 5) for v in values[i]]
                body = dict(zip(channel_names, vals, strict=True)) if channel_names else vals
                pub.publish(
                    topic.format(device_id=device), json.dumps({"ts": float(ts[i]), "values": body}).encode()
                )
                if labels_out is not None and labels[i]:
                    labels_out.write(
                        json.dumps({"device_id": device, "ts": float(ts[i]), "label": labels[i]}) + "\n"
                    )
            sent += len(ids)
            stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - tick)))
    except KeyboardInterrupt:  # a caller that did not route SIGINT to ``stop``
        pass
    finally:
        pub.close()
        if labels_out is not None:
            labels_out.flush()
    print(f"simulator: published {sent} readings from {devices} devices", file=sys.stderr)
    return 0


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[threading.Event]:
    """An event that the first of ``signals`` sets (a clean stop for :func:`run`); a second signal
    gets the handler that was there before (Python's defaults: killed by SIGTERM, KeyboardInterrupt
    on SIGINT). The previous handlers are back when the block ends. Main thread only."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        restore()

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        restore()
