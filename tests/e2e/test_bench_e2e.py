"""Smoke run of ``sensorwatch bench e2e``: it measures both workloads and both latencies (probes; every
score published), and every reading it published got an outcome. No speed is asserted: machines are
noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_e2e_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "e2e", "--quick", "--runs", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert [w["name"] for w in report["workloads"]] == ["one-reading", "gateway"]
    for w in report["workloads"]:
        assert w["bare_readings_per_s"] > 0
        assert w["service_readings_per_s"] > 0
        assert w["service_cpu_us_per_reading"] > 0
        (run,) = w["runs"]
        assert run["service"]["outcomes"] == w["readings"], "a published reading got no outcome"
        assert run["service"]["rejected"] == 0, "the bench's readings must all be scored"
        assert 0 < run["service"]["window_fraction"] <= 1

    for key, timed in (("latency", "probes"), ("latency_scores", "scores")):
        lat = report[key]
        assert lat["timed"] == timed
        assert lat["published"] > 0
        assert lat["matched"] == lat["published"], f"a live reading's outcome never arrived ({timed})"
        assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert "latency median (1 in 20 a probe) at" in proc.stdout  # the table was printed
