"""Publish a simulated fleet (:class:`sensorwatch.simulate.Fleet`) to MQTT — the ``make run`` demo
and a load generator. Labels of injected anomalies go to stdout as JSON lines when asked."""

from __future__ import annotations

import json
import sys
import time
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
) -> int:
    """Publish one reading per device every 1/``rate`` s until ``duration_s`` (or forever)."""
    fleet = Fleet(devices=devices, channels=channels, seed=seed, anomaly_rate=anomaly_rate)
    pub = MqttPublisher(url, client_id=f"sensorwatch-sim-{seed}")
    sent, t0 = 0, time.monotonic()
    try:
        while duration_s is None or time.monotonic() - t0 < duration_s:
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
            time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - tick)))
    except KeyboardInterrupt:
        pass
    finally:
        pub.close()
    print(f"simulator: published {sent} readings from {devices} devices", file=sys.stderr)
    return 0
