"""Interim `make run` demo (until the service lands): score a synthetic sensor with injected anomalies."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

out = Path("out")
out.mkdir(exist_ok=True)
rng = np.random.default_rng(7)
n = 3000
t = 1.7e9 + 300.0 * np.arange(n)
x = 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 288) + 0.2 * rng.standard_normal(n)
x[1500] += 6  # spike
x[2000:2060] = x[2000]  # stuck sensor
x[2500:] += 4  # level shift
with open(out / "demo.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["timestamp", "temperature"])
    w.writerows([[f"{a:.0f}", f"{b:.4f}"] for a, b in zip(t, x, strict=True)])
subprocess.run(
    [sys.executable, "-m", "sensorwatch.cli", "score-csv", str(out / "demo.csv"), "--out", str(out / "demo-scored.csv")],
    check=True,
)
with open(out / "demo-scored.csv") as fh:
    rows = list(csv.DictReader(fh))
flagged = [i for i, r in enumerate(rows) if r["is_anomaly"] == "1"]
print("injected: spike at row 1500, stuck sensor rows 2000-2059, level shift from row 2500")
print(f"flagged rows: {flagged}")
print(f"results with every column: {out / 'demo-scored.csv'}")
