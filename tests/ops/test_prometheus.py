"""A real Prometheus, fed the shipped ``docker/prometheus`` config and alert rules, scraping the real
service (``sensorwatch serve`` as a subprocess) while ``sensorwatch simulate`` publishes readings to a
private Mosquitto: the readings counter rises, the target is up, every alert rule evaluates against
the real series without error, and stopping the broker fires ``MQTTDisconnected``.

Only the deployment details are rewritten for the test: the scrape target (127.0.0.1 and a free port
instead of ``sensorwatch:8000``), 1 s scrape and evaluation intervals, and every rule's ``for:``
shortened to 2 s; the alert expressions are the shipped ones, unchanged. The ``prometheus`` binary
comes from ``scripts/ensure-prometheus.sh`` (``make pytest`` runs it first).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.harness import Broker, free_port
from tests.support import ADMIN_TOKEN, wait_until

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "docker" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
SENSORWATCH = str(Path(sys.executable).with_name("sensorwatch"))
SHORT_FOR = "2s"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the prometheus binary is not installed (`make prometheus` / scripts/ensure-prometheus.sh)",
)


# ------------------------------------------------------------------------------------------ processes
class Proc:
    """A subprocess with its output in a log file; :meth:`stop` terminates it, then kills it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str],
        cwd: Path,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name, self.log, self.stop_signal = name, log, stop_signal
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""


class Stack:
    """Every process of the test (and the broker): :meth:`close` stops them, the last started first,
    then prints their logs (pytest shows them only when the test fails)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[Proc] = []
        self.broker: Broker | None = None

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Proc:
        proc = Proc(name, argv, self.dir / f"{name}.log", env or dict(os.environ), self.dir, stop_signal)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        try:
            for proc in reversed(self.procs):
                started = time.monotonic()
                proc.stop()
                print(
                    f"{proc.name}: stopped with {proc.proc.returncode} in {time.monotonic() - started:.1f} s"
                )
            if self.broker is not None:
                self.broker.stop()
        finally:
            self.dump()

    def dump(self) -> None:
        logs = [(p.name, p.output()) for p in self.procs]
        if self.broker is not None:
            logs.append(("mosquitto", self.broker.log.read_text(errors="replace")[-3000:]))
        for name, text in logs:
            print(f"\n===== {name} (log tail) =====\n{text}")


# ------------------------------------------------------------------------------------------ config
def prometheus_config(rules_files: list[str], service_port: int) -> dict[str, Any]:
    """The shipped prometheus.yml with the test's target, intervals and rule files."""
    config: dict[str, Any] = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "sensorwatch"]
    assert len(jobs) == 1, "prometheus.yml needs exactly one scrape job 'sensorwatch'"
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in jobs[0]["static_configs"] for t in sc["targets"]] == ["sensorwatch:8000"]
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
    config["rule_files"] = rules_files
    return config


def shortened_rules(workdir: Path) -> list[str]:
    """The shipped rule files (found through prometheus.yml's own rule_files globs) with every ``for``
    set to :data:`SHORT_FOR`; expressions, labels and annotations untouched."""
    shipped: dict[str, Any] = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    paths = sorted(p for pattern in shipped["rule_files"] for p in glob.glob(str(PROM_DIR / pattern)))
    assert [Path(p).name for p in paths] == ["sensorwatch.rules.yml"], paths
    out = []
    for path in paths:
        rules = yaml.safe_load(Path(path).read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = SHORT_FOR
        target = workdir / Path(path).name
        target.write_text(yaml.safe_dump(rules, sort_keys=False))
        out.append(str(target))
    return out


# ------------------------------------------------------------------------------------------ API
class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _get(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.base}{path}", params=params, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def scalar(self, expr: str) -> float | None:
        """The value of a one-sample query, None when there is no sample (yet)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts named ``name``."""
        return [a for a in self._get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def alert_states(self, name: str) -> list[str]:
        return [a["state"] for a in self.alerts(name)]

    def alerting_rules(self) -> dict[str, dict[str, Any]]:
        groups = self._get("/api/v1/rules", type="alert")["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}


def _rising(api: PrometheusAPI, expr: str, timeout: float) -> tuple[float, float]:
    first = wait_until(lambda: api.scalar(expr), timeout, f"{expr} > 0", interval=0.5)
    assert first is not None
    later = wait_until(
        lambda: v if (v := api.scalar(expr)) is not None and v > first else None,
        timeout,
        f"{expr} to rise above {first}",
        interval=0.5,
    )
    assert later is not None
    return first, later


# ------------------------------------------------------------------------------------------ the test
@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.timeout(180)
def test_prometheus_scrapes_the_service_and_fires_mqtt_disconnected(tmp_path: Path, stack: Stack) -> None:
    assert PROMETHEUS is not None
    broker = stack.broker = Broker(tmp_path / "broker")
    broker.start()

    service_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "SENSORWATCH_MQTT_URL": broker.url,
            "SENSORWATCH_MQTT_CLIENT_ID": f"svc-prom-{service_port}",
            "SENSORWATCH_STATE_DIR": str(tmp_path / "state"),
            "SENSORWATCH_MODELS_DIR": str(REPO / "models"),
            "SENSORWATCH_SNAPSHOT_INTERVAL_S": "0",
            "SENSORWATCH_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    service = stack.start(
        "sensorwatch-serve",
        [SENSORWATCH, "serve", "--host", "127.0.0.1", "--port", str(service_port)],
        env,
    )

    def service_ready() -> bool:
        service.check_alive()
        try:
            return httpx.get(f"http://127.0.0.1:{service_port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(service_ready, 60, "the service's /readyz", interval=0.2)
    stack.start(
        "sensorwatch-simulate",
        [SENSORWATCH, "simulate", "--mqtt-url", broker.url, "--devices", "20", "--rate", "5"],
        env,
        stop_signal=signal.SIGINT,  # a clean stop: it prints how many readings it published
    )

    prom_port = free_port()
    config = prometheus_config(shortened_rules(tmp_path), service_port)
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    prometheus = stack.start(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
    )
    api = PrometheusAPI(prom_port)

    def prometheus_ready() -> bool:
        prometheus.check_alive()
        return api.ready()

    wait_until(prometheus_ready, 30, "Prometheus /-/ready", interval=0.2)

    # (b) the target is up; (a) the readings counter rises.
    wait_until(lambda: api.scalar('up{job="sensorwatch"}') == 1, 20, 'up{job="sensorwatch"} == 1', 0.5)
    first, later = _rising(api, "sum(sensorwatch_readings_total)", 30)
    assert later > first > 0
    assert (api.scalar('sum(sensorwatch_readings_total{outcome="scored"})') or 0) > 0

    # Every shipped alert is loaded and evaluates against the real series without an error (a bad
    # expression or a vector-matching problem only shows up with real data).
    expected = {
        "SensorwatchDown",
        "MQTTDisconnected",
        "HighRejectionRate",
        "ScoringLatencyHigh",
        "QueueBacklog",
        "AnomalyRateSpike",
        "ModelReloadFailed",
    }

    def not_ok() -> dict[str, str]:
        rules = api.alerting_rules()
        missing = {name: "not loaded" for name in expected - set(rules)}
        return missing | {
            n: f"{r['health']} {r.get('lastError', '')}" for n, r in rules.items() if r["health"] != "ok"
        }

    deadline = time.monotonic() + 20
    while bad := not_ok():
        assert time.monotonic() < deadline, f"alert rules not evaluated with health ok: {bad}"
        time.sleep(0.5)
    # Connected and healthy: nothing fires (MQTTDisconnected may have been pending before the
    # service's first connection was scraped; it must be inactive now).
    wait_until(lambda: api.scalar("sensorwatch_mqtt_connected") == 1, 20, "sensorwatch_mqtt_connected 1", 0.5)
    wait_until(lambda: api.alert_states("MQTTDisconnected") == [], 20, "MQTTDisconnected inactive", 0.5)
    assert api.alert_states("SensorwatchDown") == []

    # (c) The broker goes away: the service stays up (scraped), MQTTDisconnected fires.
    broker.stop()
    wait_until(lambda: api.alert_states("MQTTDisconnected") == ["firing"], 30, "MQTTDisconnected firing", 0.5)
    assert api.scalar('up{job="sensorwatch"}') == 1
    assert api.alert_states("SensorwatchDown") == []
    (alert,) = api.alerts("MQTTDisconnected")
    assert alert["labels"]["severity"] == "critical"
    assert alert["labels"]["job"] == "sensorwatch"
    assert (
        alert["annotations"]["summary"]
        == f"sensorwatch 127.0.0.1:{service_port} is not connected to the MQTT broker"
    )

    # The broker comes back: paho reconnects (backoff 1 -> 30 s) and the alert resolves.
    broker.start()
    wait_until(lambda: api.scalar("sensorwatch_mqtt_connected") == 1, 45, "reconnected", 0.5)
    wait_until(lambda: api.alert_states("MQTTDisconnected") == [], 20, "MQTTDisconnected resolved", 0.5)
    assert (api.scalar("sum(sensorwatch_mqtt_reconnects_total)") or 0) >= 1
    service.check_alive()
