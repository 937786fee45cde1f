"""Every sensorwatch_* series the Grafana dashboard and the Prometheus rules query is exported by the
running service: the service runs in-process against a real Mosquitto started with the shipped
docker/mosquitto/mosquitto.conf, scores readings over REST and MQTT (so the histograms have
samples), and its /metrics is compared with the names the queries use. The dashboard's queries are
also checked for PromQL syntax with promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.e2e.harness import MOSQUITTO, Broker, Publisher, new_names, running_service, service_settings
from tests.ops.stack import (
    DASHBOARD,
    PROMETHEUS,
    ROOT,
    RULES_GLOB,
    dashboard_exprs,
    exposed_samples,
    load_dashboard,
    load_yaml,
    local_mosquitto_conf,
    missing_series,
    rule_files,
    rules_exprs,
    series_in,
)
from tests.support import clear_sensorwatch_env, metric, wait_until

T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of the service after REST and MQTT readings, one of them rejected."""
    if not Path(MOSQUITTO).exists():
        pytest.fail(f"mosquitto is not installed ({MOSQUITTO}); run scripts/ensure-mosquitto.sh")
    tmp = tmp_path_factory.mktemp("series")
    with pytest.MonkeyPatch.context() as mp:
        clear_sensorwatch_env(mp)
        broker = Broker(tmp / "broker")
        broker.conf.write_text(local_mosquitto_conf(broker.port, broker.dir))
        broker.start()
        try:
            names = new_names()
            # The shipped default model, as in the image.
            settings = service_settings(names, tmp, broker.url, models_dir=ROOT / "models", max_wait_ms=1.0)
            with running_service(settings) as client:
                return _exercise(client, names.topic("mqtt-dev"), broker)
        finally:
            broker.stop()


def _exercise(client: TestClient, topic: str, broker: Broker) -> str:
    readings = [{"ts": T0 + i, "values": [20.0 + 0.1 * (i % 5)]} for i in range(40)]
    readings.append({"ts": T0 + 40, "values": [1e16]})  # rejected: value_too_large
    r = client.post("/v1/score", json={"device_id": "rest-dev", "readings": readings})
    assert r.status_code == 200, r.text
    assert [x.get("reason") for x in r.json()["results"]][-2:] == [None, "value_too_large"]
    publisher = Publisher(broker.host, broker.port)
    try:
        for i in range(5):
            publisher.publish(topic, {"ts": T0 + i, "values": [1.0 + i]})
        publisher.wait_acked()
    finally:
        publisher.close()

    def scored_over_mqtt() -> str:  # "" (falsy) until then
        text = client.get("/metrics").text
        done = metric(text, "sensorwatch_readings_total", source="mqtt", outcome="scored") >= 5
        return text if done else ""

    return wait_until(scored_over_mqtt, 30, "5 MQTT readings scored")


# --- the extraction itself ------------------------------------------------------------------------


def test_series_extraction_and_matching_catch_a_bogus_name() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(sensorwatch_score_latency_seconds_bucket[5m])))"
        " / on() sensorwatch_bogus_total + job:sensorwatch_readings:rate5m"
        ' + sensorwatch:latency:p99 + {__name__="sensorwatch_other_bogus"}'
    )
    found = series_in(expr)
    assert found == {
        "sensorwatch_score_latency_seconds_bucket",
        "sensorwatch_bogus_total",
        "sensorwatch_other_bogus",
    }
    exposition = (
        "# TYPE sensorwatch_likelihood histogram\n"
        'sensorwatch_likelihood_bucket{le="+Inf"} 1.0\nsensorwatch_likelihood_count 1.0\n'
        "sensorwatch_likelihood_sum 0.5\n"
        'sensorwatch_score_latency_seconds_bucket{le="+Inf"} 1.0\nsensorwatch_readings_total{a="b"} 2\n'
    )
    assert missing_series(found, exposition) == ["sensorwatch_bogus_total", "sensorwatch_other_bogus"]
    # A histogram's base name counts as exported; a counter's name without _total does not.
    assert missing_series({"sensorwatch_likelihood", "sensorwatch_readings"}, exposition) == [
        "sensorwatch_readings"
    ]
    assert missing_series({"sensorwatch_recorded"}, exposition, defined={"sensorwatch_recorded"}) == []


def test_dashboard_extraction_sees_every_target() -> None:
    dash = {
        "panels": [
            {"type": "row", "panels": [{"targets": [{"expr": "rate(sensorwatch_hidden_total[1m])"}]}]},
            {"targets": [{"expr": "sensorwatch_queue_depth"}, {"expr": ""}]},
        ],
        "templating": {"list": [{"query": {"query": "label_values(sensorwatch_model_info, instance)"}}]},
    }
    names = set().union(*(series_in(e) for e in dashboard_exprs(dash)))
    assert names == {"sensorwatch_hidden_total", "sensorwatch_queue_depth", "sensorwatch_model_info"}


# --- against the running service ------------------------------------------------------------------


def test_the_service_exports_its_documented_metrics(exposition: str) -> None:
    samples = exposed_samples(exposition)
    for name in (
        "sensorwatch_readings_total",
        "sensorwatch_rejections_total",
        "sensorwatch_score_latency_seconds_bucket",
        "sensorwatch_likelihood_bucket",
        "sensorwatch_model_info",
        "sensorwatch_mqtt_connected",
    ):
        assert name in samples, name
    assert metric(exposition, "sensorwatch_mqtt_connected") == 1.0
    assert metric(exposition, "sensorwatch_model_info", name="univariate", version="2") == 1.0
    assert metric(exposition, "sensorwatch_score_latency_seconds_count") >= 45


CLUSTER_PREFIX = "sensorwatch_cluster_"


def test_every_dashboard_series_is_exported(exposition: str) -> None:
    """The single-node service exports every series but the cluster panels' (next test)."""
    names = set().union(*(series_in(e) for e in dashboard_exprs(load_dashboard())))
    names = {n for n in names if not n.startswith(CLUSTER_PREFIX)}
    assert len(names) >= 12, names
    assert missing_series(names, exposition) == [], (
        f"{DASHBOARD.name} queries series the service does not export"
    )


def test_the_cluster_panels_series_are_exported_by_a_worker() -> None:
    """The cluster panels query what a cluster-mode worker's metrics export from its start (the
    worker's own app is exercised end to end in tests/cluster)."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    names = set().union(*(series_in(e) for e in dashboard_exprs(load_dashboard())))
    cluster = {n for n in names if n.startswith(CLUSTER_PREFIX)}
    assert len(cluster) >= 3, cluster
    worker = generate_latest(Metrics(mqtt=False, cluster=True).registry).decode()
    assert missing_series(cluster, worker) == []
    single = generate_latest(Metrics(mqtt=True).registry).decode()
    assert CLUSTER_PREFIX not in single  # a single-node service exports none of them


def test_every_alert_rule_series_is_exported(exposition: str) -> None:
    files = rule_files()
    assert files, f"no Prometheus rules under {PROMETHEUS / RULES_GLOB}"
    names: set[str] = set()
    recorded: set[str] = set()
    for path in files:
        exprs, defined = rules_exprs(load_yaml(path))
        assert exprs, f"{path.name} has no rules"
        recorded |= defined
        for e in exprs:
            names |= series_in(e)
    assert names, "the rules query no sensorwatch_* series"
    assert missing_series(names, exposition, defined=recorded) == []


# --- PromQL syntax --------------------------------------------------------------------------------


def _grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
    return re.sub(r"\$\{?instance\}?", ".*", expr)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run scripts/ensure-prometheus.sh")
    exprs = [
        _grafana_to_promql(e)
        for e in dashboard_exprs(load_dashboard())
        if not e.startswith("label_values(")  # a Grafana function, not PromQL
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout, out.stdout
