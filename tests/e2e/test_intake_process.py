"""The MQTT intake process (``MQTT_INTAKE=process``, the default): its lifetime is tied to the service's.

* The service killed with SIGKILL → the intake process notices (end of file on its command pipe)
  and exits at once without a clean disconnect: the broker publishes the last will (``offline``)
  and keeps the session for the restart, which scores what was published meanwhile.
* The intake process killed → the service says so on ``/readyz`` (503) instead of looking healthy
  while nothing is consumed.

(Scoring, dead letters, hostile payloads, crashes and faults through the process are the other
e2e tests, which run with the default; ``test_mqtt`` also runs the dead-letter test with ``thread``.)
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from service.bench_e2e import child_pids
from tests.e2e.harness import Broker, Collector, Names, Publisher, running_service, service_settings
from tests.e2e.procs import ServiceProcess
from tests.support import metric, wait_until

T0 = 1_767_225_600.0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


def test_intake_process_exits_with_the_killed_service_and_the_will_is_published(
    names: Names, tmp_path: Path, private_broker: Broker
) -> None:
    env = {
        "SENSORWATCH_MQTT_URL": private_broker.url,
        "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
        "SENSORWATCH_TOPIC_READINGS": names.readings,
        "SENSORWATCH_TOPIC_PREFIX": names.prefix,
        "SENSORWATCH_STATE_DIR": str(tmp_path / "state"),
        "SENSORWATCH_MODEL": "builtin",
        "SENSORWATCH_PUBLISH_SCORES": "true",
    }
    collector = Collector(names.prefix, private_broker.host, private_broker.port)
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        with ServiceProcess(env, tmp_path / "logs") as svc:
            svc.start()
            svc.wait_ready(60)
            assert svc.pid is not None
            intake = child_pids(svc.pid)
            assert len(intake) == 1, f"one intake process expected, found {intake}"
            assert "service.intake" in Path(f"/proc/{intake[0]}/cmdline").read_text()
            wait_until(lambda: collector.statuses()[-1:] == ["online"], 10, "online status")

            svc.kill9()
            wait_until(lambda: not alive(intake[0]), 10, "the intake process to exit")
            wait_until(lambda: collector.statuses()[-1:] == ["offline"], 10, "the will (offline)")

            for i in range(5):  # while nobody is there: queued in the persistent session
                publisher.publish(names.topic("dev-1"), json.dumps({"ts": T0 + 60 * i, "values": [1.0]}))
            publisher.wait_acked()
            svc.start()
            svc.wait_ready(60)
            wait_until(lambda: collector.count("scores") >= 5, 20, "5 scores after the restart")
            assert collector.count("scores") == 5
    finally:
        publisher.close()
        collector.close()


def test_a_killed_intake_process_makes_the_service_unready(
    names: Names, tmp_path: Path, shared_broker: str
) -> None:
    settings = service_settings(names, tmp_path, shared_broker, model="builtin")
    with running_service(settings) as client:
        svc = client.app.state.service  # type: ignore[attr-defined]
        proc = svc.mqtt._proc
        assert proc is not None
        assert alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        r = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 10, "/readyz 503")
        assert r.json()["failure"] == "the MQTT intake process exited"
        assert r.json()["mqtt_connected"] is False
        wait_until(
            lambda: metric(client.get("/metrics").text, "sensorwatch_mqtt_connected") == 0, 10, "gauge 0"
        )
        started = time.monotonic()
    assert time.monotonic() - started < 30  # the stop does not hang on the dead process
