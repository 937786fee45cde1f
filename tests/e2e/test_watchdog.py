"""The watchdog (issue #13, scope 1): a thread the service needs dies anyway (a bug; here an injected
fault that no ``except Exception`` catches) — ``/readyz`` turns 503 with the cause,
``sensorwatch_ready`` drops to 0, the cause is logged once, and ``sensorwatch serve`` exits with
status 70 for its supervisor to restart it; the restart recovers every reading applied before."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import service.app as app_module
from sensorwatch import faults
from service.app import create_app
from service.runtime import EXIT_FAILED, WATCHDOG_EXIT_AFTER_S
from tests.e2e.harness import Names, Publisher, service_settings
from tests.e2e.procs import ServiceProcess
from tests.support import metric, wait_until

T0 = 1_767_225_600

#: The injected fault is an exception escaping a thread, which pytest reports as a warning (an error).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def _one(i: int, device: str = "w") -> dict[str, object]:
    return {"device_id": device, "readings": [{"ts": T0 + i, "values": [1.0]}]}


def test_a_dead_batcher_makes_the_service_unready_logs_once_and_calls_on_fatal(
    names: Names, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(faults, "_raise_target", ("batcher.step", 2))
    monkeypatch.setattr(faults, "_raise_seen", 0)
    monkeypatch.setattr(app_module, "RESULT_TIMEOUT_S", WATCHDOG_EXIT_AFTER_S + 1.0)
    fatal: list[tuple[float, str]] = []
    settings = service_settings(names, tmp_path, "", model="builtin")
    caplog.set_level(logging.INFO, logger="sensorwatch.service")
    with TestClient(
        create_app(settings, on_fatal=lambda why: fatal.append((time.monotonic(), why)))
    ) as client:
        assert client.post("/v1/score", json=_one(0)).status_code == 200
        wait_until(lambda: metric(client.get("/metrics").text, "sensorwatch_ready") == 1, 5, "ready 1")
        # The second batch meets the fault: the batcher thread dies with this request in hand; its
        # answer (after the REST wait) says the service failed, not that the reading is being scored.
        answer: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: answer.append(client.post("/v1/score", json=_one(1))))
        caller.start()
        r = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 5, "/readyz 503")
        died = time.monotonic()
        assert r.json()["failure"].startswith("thread sensorwatch-batcher died: InjectedFault")
        assert metric(client.get("/metrics").text, "sensorwatch_ready") == 0
        wait_until(lambda: fatal, WATCHDOG_EXIT_AFTER_S + 5, "on_fatal called")
        assert fatal[0][0] - died >= WATCHDOG_EXIT_AFTER_S - 1.0  # time for a scrape first
        assert fatal[0][1] == r.json()["failure"]
        caller.join(10)
        assert answer[0].status_code == 503
        assert answer[0].json()["reason"] == "service_failed"
        assert len(fatal) == 1
    lines = [rec for rec in caplog.records if "cannot score" in rec.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.CRITICAL


def test_a_dead_mqtt_thread_makes_the_service_unready(
    names: Names, tmp_path: Path, shared_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MQTT_INTAKE=thread: paho's network thread dies on a message (the process intake's death is
    tests/e2e/test_intake_process.py's). Before the watchdog ``sensorwatch_mqtt_connected`` stayed 1."""
    monkeypatch.setattr(faults, "_raise_target", ("mqtt.message", 3))
    monkeypatch.setattr(faults, "_raise_seen", 0)
    settings = service_settings(names, tmp_path, shared_broker, model="builtin", mqtt_intake="thread")
    publisher = Publisher()
    try:
        with TestClient(create_app(settings, on_fatal=lambda why: None)) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, 20, "/readyz 200")
            for i in range(5):
                publisher.publish(names.topic("m"), {"ts": T0 + i, "values": [1.0]})
            r = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 10, "/readyz 503")
            assert "died: InjectedFault" in r.json()["failure"]
            assert metric(client.get("/metrics").text, "sensorwatch_ready") == 0
            wait_until(  # set by the watchdog (paho's thread died without a disconnect callback)
                lambda: metric(client.get("/metrics").text, "sensorwatch_mqtt_connected") == 0, 5, "gauge 0"
            )
    finally:
        publisher.close()


def test_serve_exits_70_and_the_restart_recovers_what_was_applied(tmp_path: Path) -> None:
    """The real process: the batcher dies on its third batch; ``sensorwatch serve`` exits with status
    70 about WATCHDOG_EXIT_AFTER_S later, its log holds the cause once; started again (no fault) it
    is ready with the two readings applied before the fault."""
    env = {"SENSORWATCH_STATE_DIR": str(tmp_path / "state"), "SENSORWATCH_MODEL": "builtin"}
    with ServiceProcess({**env, "SENSORWATCH_TEST_RAISE_AT": "batcher.step:3"}, tmp_path) as svc:
        svc.start()
        svc.wait_ready(60)
        for i in range(2):
            assert httpx.post(svc.url + "/v1/score", json=_one(i), timeout=10).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.post(svc.url + "/v1/score", json=_one(2), timeout=WATCHDOG_EXIT_AFTER_S + 10)
        assert svc.wait_exit(30) == EXIT_FAILED
        assert svc.log_text().count("cannot score") == 1
        assert "thread sensorwatch-batcher died: InjectedFault" in svc.log_text()
        svc.env.pop("SENSORWATCH_TEST_RAISE_AT")
        svc.start()
        svc.wait_ready(60)
        assert svc.get("/v1/devices/w").json()["count"] == 2
        assert svc.stop() == 0
