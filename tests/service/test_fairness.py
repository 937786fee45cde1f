"""Fair scoring under load (issue #13, scope 2): heavy REST callers do not starve the others, and an
answer that times out never hides readings that were in fact scored.

The load test runs the real service (``sensorwatch serve``: uvicorn, the batcher, the WAL) in its own
process; the heavy and the probing callers are threads of this process (their client-side work only
makes the measured latency worse)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import service.app as app_module
from tests.e2e.procs import ServiceProcess
from tests.service.test_api import make_client, models_dir  # noqa: F401  (the fixture)
from tests.support import metric

T0 = 1_767_225_600


def _body(device: str, n: int) -> bytes:
    rows = [{"ts": T0 + i, "values": [20.0 + float(np.sin(i / 8.0))]} for i in range(n)]
    return json.dumps({"device_id": device, "readings": rows}).encode()


def test_heavy_requests_and_dry_runs_do_not_starve_other_callers(tmp_path: Path) -> None:
    """Two 10,000-reading requests and six concurrent 10,000-reading dry runs (the issue's attack)
    while four callers score one reading every 50 ms: the callers' p99 latency stays under 1 s, every
    live heavy request is answered in full, and every dry run is answered (or told to retry: 503)."""
    heavy = [("live", _body(f"big{j}", 10_000)) for j in range(2)]
    heavy += [("dry", _body(f"dry{j}", 10_000)) for j in range(6)]
    with ServiceProcess({"SENSORWATCH_STATE_DIR": str(tmp_path / "state")}, tmp_path) as svc:
        svc.start()
        svc.wait_ready(60)
        latencies: list[float] = []
        codes: list[int] = []
        stop = threading.Event()

        def probe(k: int) -> None:
            with httpx.Client(base_url=svc.url, timeout=30) as c:
                i = 0
                while not stop.is_set():
                    doc = {"device_id": f"probe{k}", "readings": [{"ts": T0 + i, "values": [1.0]}]}
                    t = time.monotonic()
                    r = c.post("/v1/score", json=doc)
                    latencies.append(time.monotonic() - t)
                    codes.append(r.status_code)
                    i += 1
                    time.sleep(0.05)

        answers: list[tuple[str, int, int]] = []

        def big(kind: str, body: bytes) -> None:
            path = "/v1/score?dry_run=true" if kind == "dry" else "/v1/score"
            r = httpx.post(
                svc.url + path, content=body, headers={"content-type": "application/json"}, timeout=60
            )
            n = len(r.json()["results"]) if r.status_code == 200 else 0
            answers.append((kind, r.status_code, n))

        probes = [threading.Thread(target=probe, args=(k,)) for k in range(4)]
        for t in probes:
            t.start()
        time.sleep(1.0)
        calm = len(latencies)
        threads = [threading.Thread(target=big, args=h) for h in heavy]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        heavy_s = time.monotonic() - started
        time.sleep(0.5)
        stop.set()
        for t in probes:
            t.join()
        under_load = sorted(latencies[calm:])
        p99 = under_load[int(0.99 * (len(under_load) - 1))]
        print(
            f"\nheavy requests done in {heavy_s:.2f} s; {len(under_load)} probe calls meanwhile: "
            f"p50 {under_load[len(under_load) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"max {under_load[-1] * 1000:.0f} ms; answers {sorted(answers)}"
        )
        assert set(codes) == {200}
        assert len(under_load) >= 20, "the probes barely ran during the load"
        assert p99 < 1.0
        assert sorted(a for a in answers if a[0] == "live") == [("live", 200, 10_000)] * 2
        assert all(code in (200, 503) and (code == 503 or n == 10_000) for kind, code, n in answers)
        text = svc.metrics()
        assert metric(text, "sensorwatch_readings_total", source="rest", outcome="scored") >= 20_000


def test_a_timed_out_answer_says_the_readings_are_being_scored(
    tmp_path: Path,
    models_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injection: the scorer takes longer than the REST wait. The answer is a 504 saying the
    readings are queued and will be scored — and they are: the device advances, a resend is refused
    per reading (out_of_order, duplicate_timestamp for the last), never scored twice."""
    monkeypatch.setattr(app_module, "RESULT_TIMEOUT_S", 0.3)
    doc = {"device_id": "slow", "readings": [{"ts": T0 + i, "values": [1.0]} for i in range(5)]}
    with make_client(tmp_path, models_dir) as client:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        apply = engine.apply_parts

        def slow_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
            time.sleep(1.0)
            return apply(*args, **kwargs)

        monkeypatch.setattr(engine, "apply_parts", slow_apply)
        r = client.post("/v1/score", json=doc)
        assert r.status_code == 504, r.text
        assert r.json()["reason"] == "result_timeout"
        assert "do not resend" in r.json()["detail"]
        time.sleep(1.5)  # the batch finishes meanwhile
        assert client.get("/v1/devices/slow").json()["count"] == 5
        monkeypatch.setattr(engine, "apply_parts", apply)
        again = client.post("/v1/score", json=doc)
        assert again.status_code == 200
        results = again.json()["results"]
        assert not any(res["accepted"] for res in results)
        assert results[-1]["reason"] == "duplicate_timestamp"  # the earlier ones: out_of_order
        assert {res["reason"] for res in results[:-1]} == {"out_of_order"}
        assert client.get("/v1/devices/slow").json()["count"] == 5
