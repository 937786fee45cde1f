"""The operations stack's files, read for real (no Docker needed): docker-compose.yml, the
Dockerfile and .dockerignore, Mosquitto's configuration (also run by a real mosquitto), Grafana's
provisioning and dashboard."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from service.cli import build_parser
from service.settings import load_settings
from tests.e2e.harness import MOSQUITTO, Broker
from tests.ops.stack import (
    COMPOSE,
    DASHBOARD,
    DOCKERFILE,
    GRAFANA,
    MOSQUITTO_CONF,
    PROMETHEUS,
    ROOT,
    Instruction,
    dashboard_panels,
    dockerfile_env,
    dockerfile_instructions,
    dockerignore_excludes,
    env_refs,
    environment,
    exec_form,
    interpolate,
    load_compose,
    load_dashboard,
    load_yaml,
    local_mosquitto_conf,
    mosquitto_options,
    setting_env_names,
    unknown_settings,
)
from tests.support import clear_sensorwatch_env, wait_until

SERVICES = {"mosquitto", "sensorwatch", "prometheus", "grafana", "simulator"}
CLUSTER = {"nats-1", "nats-2", "nats-3", "worker-1", "worker-2", "worker-3"}
HTTP_PORT = 8000


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions()


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes (short or long syntax)."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = str(v.get("source", "")), str(v["target"])
        out.append((source, target))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def published(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs."""
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add((int(p["published"]), int(p["target"])))
        else:
            host, container = str(p).rsplit(":", 2)[-2:]
            out.add((int(host), int(container.split("/")[0])))
    return out


def only(instructions: list[Instruction], cmd: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in instructions if i.cmd == cmd and (stage is None or i.stage == stage)]


# --- settings named in the stack are real settings ------------------------------------------------


def test_setting_env_names_come_from_the_settings_class() -> None:
    names = setting_env_names()
    assert {"SENSORWATCH_MQTT_URL", "SENSORWATCH_ADMIN_TOKEN", "SENSORWATCH_STATE_DIR"} <= names
    assert "SENSORWATCH_MODELS_DIR" in names
    assert all(n.startswith("SENSORWATCH_") and n == n.upper() for n in names)


def test_unknown_settings_catches_a_bogus_name() -> None:
    assert unknown_settings(["SENSORWATCH_MQTT_URL", "SENSORWATCH_BOGUS_SETTING"]) == [
        "SENSORWATCH_BOGUS_SETTING"
    ]
    assert unknown_settings(["sensorwatch_mqtt_url", "PATH"]) == []
    assert unknown_settings(["sensorwatch_http_port"]) == ["sensorwatch_http_port"]
    # ... also when it only appears in a compose-like text or an ENV line.
    text = (
        "environment:\n  SENSORWATCH_MQTT_URL: mqtt://m:1883\n"
        "  X: ${SENSORWATCH_MAX_BATCHES:-10}\nENV SENSORWATCH_STATE_DIR=/s\n"
    )
    assert env_refs(text) == {"SENSORWATCH_MQTT_URL", "SENSORWATCH_MAX_BATCHES", "SENSORWATCH_STATE_DIR"}
    assert unknown_settings(env_refs(text)) == ["SENSORWATCH_MAX_BATCHES"]


def test_every_sensorwatch_variable_in_compose_and_dockerfile_is_a_setting(
    services: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    names = env_refs(COMPOSE.read_text()) | env_refs(DOCKERFILE.read_text())
    for svc in services.values():
        names |= set(environment(svc))
    names |= set(dockerfile_env(dockerfile))
    assert {"SENSORWATCH_MQTT_URL", "SENSORWATCH_ADMIN_TOKEN", "SENSORWATCH_STATE_DIR"} <= names
    assert unknown_settings(names) == []


def test_the_image_and_compose_settings_are_valid(
    monkeypatch: pytest.MonkeyPatch, services: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    """The container's effective settings (image ENV, then Compose's environment with the defaults
    of its ${...} substitutions) pass the service's own validation."""
    clear_sensorwatch_env(monkeypatch)
    env = dockerfile_env(dockerfile)
    compose_env = environment(services["sensorwatch"])
    # No default admin token: Compose refuses to start until the operator sets one.
    with pytest.raises(ValueError, match="SENSORWATCH_ADMIN_TOKEN"):
        [interpolate(v) for v in compose_env.values()]
    shell = {"SENSORWATCH_ADMIN_TOKEN": "0123456789abcdef"}
    env.update({k: interpolate(v, shell) for k, v in compose_env.items()})
    for key, value in env.items():
        if key.startswith("SENSORWATCH_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.broker()["host"] == "mosquitto"
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "0123456789abcdef"
    assert settings.state_dir == Path("/var/lib/sensorwatch")


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_has_the_five_services_and_the_cluster_profile(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES | CLUSTER
    for name in CLUSTER:
        assert services[name]["profiles"] == ["cluster"], name


def test_cluster_profile_nodes_carry_the_mapping_the_workers_expect(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each NATS node's config holds exactly what ``sensorwatch cluster-config`` prints, and each
    worker is in cluster mode against all three nodes, with its own id."""
    from service.cluster.topology import Topology
    from service.cluster.worker import MIN_SERVER_VERSION

    expected = Topology("sensors/+/readings", "sensorwatch", 12, "sensorwatch").server_config("0.0.0.0:1883")
    for i in (1, 2, 3):
        node = services[f"nats-{i}"]
        version = re.fullmatch(r"nats:(\d+)\.(\d+)\.(\d+)-alpine", node["image"])
        assert version, node["image"]
        assert tuple(map(int, version.groups())) >= MIN_SERVER_VERSION, node["image"]
        (source, target), *_ = mounts(node)
        assert target == "/etc/nats/nats.conf"
        assert expected in (ROOT / source).read_text()
        env = environment(services[f"worker-{i}"])
        assert env["SENSORWATCH_NATS_URL"] == "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222"
        assert env["SENSORWATCH_WORKER_ID"] == f"worker-{i}"
        assert services[f"worker-{i}"]["image"] == services["sensorwatch"]["image"]


def test_sensorwatch_and_simulator_build_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name in ("sensorwatch", "simulator"):
        build = services[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert DOCKERFILE.is_file()
    assert services["simulator"]["image"] == services["sensorwatch"]["image"]  # one image, built once


def test_third_party_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name in ("mosquitto", "prometheus", "grafana"):
        image = services[name]["image"]
        repo, _, tag = image.rpartition(":")
        assert repo, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert tag not in ("", "latest"), f"{name}: {image} is not pinned"
        assert re.match(r"v?\d", tag), f"{name}: {image} tag is not a version"


def test_ports_are_published(services: dict[str, dict[str, Any]]) -> None:
    assert (1883, 1883) in published(services["mosquitto"])
    assert (HTTP_PORT, HTTP_PORT) in published(services["sensorwatch"])
    assert (9090, 9090) in published(services["prometheus"])
    assert (3000, 3000) in published(services["grafana"])


def test_healthchecks_on_broker_and_service(services: dict[str, dict[str, Any]]) -> None:
    for name in ("mosquitto", "sensorwatch"):
        hc = services[name].get("healthcheck")
        assert hc, name
        assert not hc.get("disable"), name
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert len(hc["test"]) > 1, name
    mosq = services["mosquitto"]["healthcheck"]["test"]
    assert "mosquitto_sub" in mosq
    assert "$$SYS/#" in mosq, "'$SYS' must be written '$$SYS' (else Compose substitutes $SYS)"
    svc = " ".join(services["sensorwatch"]["healthcheck"]["test"])
    assert re.search(rf"127\.0\.0\.1:{HTTP_PORT}/(readyz|healthz)", svc)


def strings(node: Any) -> list[str]:
    """Every string (keys and values) of a parsed YAML document."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def bare_dollars(doc: Any) -> list[str]:
    return [s for s in strings(doc) if re.search(r"\$(?!\{)", s.replace("$$", ""))]


def test_no_bare_dollar_substitutions(compose: dict[str, Any]) -> None:
    """Compose substitutes $NAME and ${NAME} in values; a literal '$' must be written '$$'."""
    assert bare_dollars(compose) == []
    assert bare_dollars({"test": ["$$SYS/#", "${X:-1}", "$SYS/#"]}) == ["$SYS/#"]


def test_service_waits_for_a_healthy_broker(services: dict[str, dict[str, Any]]) -> None:
    assert services["sensorwatch"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    sim = services["simulator"]["depends_on"]
    assert sim["sensorwatch"]["condition"] == "service_healthy"


def test_named_volumes_for_state_and_broker_persistence(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    declared = set(compose.get("volumes") or {})
    for svc in services.values():
        for source, _ in mounts(svc):
            if source and not is_bind(source):
                assert source in declared, f"volume {source} is not declared"
    state_dir = environment(services["sensorwatch"]).get(
        "SENSORWATCH_STATE_DIR", dockerfile_env(dockerfile)["SENSORWATCH_STATE_DIR"]
    )
    state = dict((t, s) for s, t in mounts(services["sensorwatch"]))
    assert state.get(state_dir) in declared, "device state must live on a named volume"
    persistence = dict(mosquitto_options())["persistence_location"].rstrip("/")
    broker = dict((t.rstrip("/"), s) for s, t in mounts(services["mosquitto"]))
    assert broker.get(persistence) in declared, "broker persistence must live on a named volume"


def test_every_bind_mount_exists_in_the_repo(services: dict[str, dict[str, Any]]) -> None:
    binds = [(name, s) for name, svc in services.items() for s, _ in mounts(svc) if is_bind(s)]
    assert len(binds) >= 4
    for name, source in binds:
        assert source.startswith("./"), f"{name}: bind mount {source} should be relative to the repo"
        assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_mounted_configuration_lands_where_the_images_read_it(services: dict[str, dict[str, Any]]) -> None:
    mosq = dict((t, s) for s, t in mounts(services["mosquitto"]))
    assert (ROOT / mosq["/mosquitto/config/mosquitto.conf"]).resolve() == MOSQUITTO_CONF
    prom = dict((t, s) for s, t in mounts(services["prometheus"]))
    assert (ROOT / prom["/etc/prometheus"]).resolve() == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    graf = dict((t, s) for s, t in mounts(services["grafana"]))
    assert (ROOT / graf["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"


def test_prometheus_scrapes_the_compose_service() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    targets = {
        t for job in config["scrape_configs"] for sc in job.get("static_configs") or [] for t in sc["targets"]
    }
    assert f"sensorwatch:{HTTP_PORT}" in targets


def test_grafana_anonymous_viewer_and_home_dashboard(services: dict[str, dict[str, Any]]) -> None:
    graf = services["grafana"]
    env = environment(graf)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    # The home dashboard path resolves, through a bind mount, to the dashboard in the repo.
    for source, target in mounts(graf):
        if is_bind(source) and home.is_relative_to(target):
            assert (ROOT / source / home.relative_to(target)).resolve() == DASHBOARD
            break
    else:
        pytest.fail(f"{home} is not inside a bind mount of grafana")


def test_simulator_is_a_demo_profile_with_real_flags(services: dict[str, dict[str, Any]]) -> None:
    sim = services["simulator"]
    assert "demo" in sim["profiles"]
    command = [interpolate(str(a)) for a in sim["command"]]
    assert command[:2] == ["sensorwatch", "simulate"]
    args = build_parser().parse_args(command[1:])  # the real CLI: an unknown flag exits
    assert args.mqtt_url == "mqtt://mosquitto:1883"
    assert args.devices > 0
    assert args.rate > 0


def test_service_command_and_ports_agree(
    services: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    cmd = exec_form(only(dockerfile, "CMD")[-1].args)
    assert cmd[:2] == ["sensorwatch", "serve"]
    args = build_parser().parse_args(cmd[1:])
    assert (args.host, args.port) == ("0.0.0.0", HTTP_PORT)
    assert not args.insecure_no_auth
    assert "command" not in services["sensorwatch"]  # the image's CMD


# --- Dockerfile and .dockerignore -----------------------------------------------------------------


def test_dockerfile_is_multi_stage_from_python_311_slim(dockerfile: list[Instruction]) -> None:
    froms = only(dockerfile, "FROM")
    assert len(froms) >= 2
    assert all(f.args.split()[0] == "python:3.11-slim" for f in froms)
    builder = froms[0].args.split()[-1]
    copies = [exec_form(c.args) for c in only(dockerfile, "COPY", stage=len(froms) - 1)]
    assert any(f"--from={builder}" in c and "/opt/venv" in c for c in copies)


def test_dockerfile_installs_cpu_torch_then_the_project(dockerfile: list[Instruction]) -> None:
    runs = [i.args for i in only(dockerfile, "RUN", stage=0)]
    torch_at = next(n for n, r in enumerate(runs) if "torch==" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    project_at = next(n for n, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < project_at
    assert not any(re.search(r"pip install .*(-e\b|--editable|\[dev\])", r) for r in runs)


def test_dockerfile_copies_models_where_the_models_dir_setting_points(dockerfile: list[Instruction]) -> None:
    last = max(i.stage for i in dockerfile)
    copies = [exec_form(c.args) for c in only(dockerfile, "COPY", stage=last)]
    models = [c for c in copies if c[0].rstrip("/") == "models"]
    assert models, "the shipped models/ are not copied into the image"
    assert models[0][-1].rstrip("/") == dockerfile_env(dockerfile)["SENSORWATCH_MODELS_DIR"]


def test_dockerfile_runs_as_a_non_root_user_owning_the_state_dir(dockerfile: list[Instruction]) -> None:
    users = only(dockerfile, "USER")
    assert users, "no USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(i.args for i in only(dockerfile, "RUN", stage=max(i.stage for i in dockerfile)))
    state_dir = dockerfile_env(dockerfile)["SENSORWATCH_STATE_DIR"]
    assert f"--uid {user}" in runs or f"-u {user}" in runs
    assert re.search(rf"chown {user}(:\d+)? {re.escape(state_dir)}", runs)
    assert any(state_dir in exec_form(v.args) for v in only(dockerfile, "VOLUME"))


def test_dockerfile_healthcheck_and_port(dockerfile: list[Instruction]) -> None:
    (hc,) = only(dockerfile, "HEALTHCHECK")
    assert f"http://127.0.0.1:{HTTP_PORT}/healthz" in hc.args
    assert "urllib.request" in hc.args  # no curl in the slim image
    assert str(HTTP_PORT) in only(dockerfile, "EXPOSE")[-1].args.split()


def test_dockerfile_sources_are_in_the_build_context(dockerfile: list[Instruction]) -> None:
    sources = []
    for c in only(dockerfile, "COPY"):
        args = [a for a in exec_form(c.args) if not a.startswith("--")]
        if not any(a.startswith("--from") for a in exec_form(c.args)):
            sources += args[:-1]
    assert {"pyproject.toml", "README.md", "sensorwatch/", "service/", "models/"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not dockerignore_excludes(src), f"{src} is excluded by .dockerignore"
    for f in (
        "sensorwatch/cli.py",
        "service/app.py",
        "models/univariate/2/card.json",
        "models/univariate/2/model.safetensors",
    ):
        assert not dockerignore_excludes(f), f


def test_dockerignore_keeps_local_artifacts_out() -> None:
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "out/bench-engine.json",
        "state/devices.safetensors",
        "tests/test_readme.py",
        ".pytest_cache/v",
        ".mypy_cache/x",
        "sensorwatch/__pycache__/cli.cpython-311.pyc",
        "sensorwatch.egg-info/PKG-INFO",
        "models/univariate/.checkpoint/last.json",
    ):
        assert dockerignore_excludes(path), path


def test_dockerignore_matcher_semantics() -> None:
    rules = "*\n!src/\n**/__pycache__\n# comment\n/build\n"
    assert dockerignore_excludes("other.txt", rules)
    assert not dockerignore_excludes("src/a.py", rules)
    assert dockerignore_excludes("src/__pycache__/a.pyc", rules)
    assert not dockerignore_excludes("x", "build\n")
    assert dockerignore_excludes("build/x", "/build\n")


# --- Mosquitto ------------------------------------------------------------------------------------


def test_mosquitto_conf_limits() -> None:
    opts = mosquitto_options()
    conf = dict(opts)
    assert conf["persistence"] == "true"
    assert conf["persistence_location"] == "/mosquitto/data/"
    assert int(conf["autosave_interval"]) <= 60
    assert int(conf["max_queued_messages"]) >= 10_000
    assert int(conf["max_inflight_messages"]) >= 20
    assert ("listener", "1883") in opts
    assert conf["allow_anonymous"] == "true"  # the demo; the commented sections explain the rest
    text = MOSQUITTO_CONF.read_text()
    documented = ("#password_file", "mosquitto_passwd", "#listener 8883", "#cafile", "#certfile", "#keyfile")
    for option in documented:
        assert option in text, option


def test_mosquitto_accepts_the_shipped_conf(tmp_path: Path) -> None:
    """A real mosquitto starts with the shipped file (only port and data dir changed), serves an MQTT
    client, and writes its persistence database on stop."""
    if not Path(MOSQUITTO).exists():
        pytest.fail(f"mosquitto is not installed ({MOSQUITTO}); run scripts/ensure-mosquitto.sh")
    broker = Broker(tmp_path / "broker")
    broker.conf.write_text(local_mosquitto_conf(broker.port, broker.dir))
    broker.start()
    try:
        got: list[bytes] = []

        def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            got.append(bytes(msg.payload))

        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        client.subscribe("$SYS/broker/version")
        client.loop_start()
        try:
            wait_until(lambda: got, 10, "$SYS/broker/version")  # retained: served at once
        finally:
            client.disconnect()
            client.loop_stop()
        assert got[0].startswith(b"mosquitto version 2.")
    finally:
        broker.stop()
    log = broker.log.read_text()
    assert "Error" not in log, log
    assert (broker.dir / "mosquitto.db").is_file(), log


# --- Grafana --------------------------------------------------------------------------------------

REQUIRED_PANELS = {
    # title (contained, case-insensitive) -> the series its queries must use
    "readings/s by outcome": "sensorwatch_readings_total",
    "anomalies/s": "sensorwatch_anomalies_total",
    "score latency p50/p99": "sensorwatch_score_latency_seconds_bucket",
    "batch size": "sensorwatch_batch_size_bucket",
    "queue depth": "sensorwatch_queue_depth",
    "active devices": "sensorwatch_active_devices",
    "evictions/s": "sensorwatch_device_evictions_total",
    "rejections/s by reason": "sensorwatch_rejections_total",
    "mqtt connected": "sensorwatch_mqtt_connected",
    "mqtt reconnects": "sensorwatch_mqtt_reconnects_total",
    "model version": "sensorwatch_model_info",
    "likelihood distribution": "sensorwatch_likelihood_bucket",
}


def test_grafana_datasource_provisioning() -> None:
    doc = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert (ds["uid"], ds["type"], ds["url"], ds["isDefault"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
        True,
    )


def test_grafana_dashboard_provider(services: dict[str, dict[str, Any]]) -> None:
    doc = load_yaml(GRAFANA / "provisioning" / "dashboards" / "sensorwatch.yml")
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    graf = dict((t, s) for s, t in mounts(services["grafana"]))
    assert (ROOT / graf[path] / DASHBOARD.name).resolve() == DASHBOARD


def test_dashboard_parses_with_uid_and_datasource() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "sensorwatch"
    assert dash["schemaVersion"] >= 36
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["w"] > 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for ds in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]:
            if ds is not None:
                assert ds == {"type": "prometheus", "uid": "prometheus"}, p["title"]


def test_every_panel_has_a_query() -> None:
    for p in dashboard_panels(load_dashboard()):
        if p["type"] == "row":
            continue
        exprs = [t.get("expr", "").strip() for t in p.get("targets") or []]
        assert any(exprs), f"panel {p['title']!r} has no query"
        assert all(exprs), f"panel {p['title']!r} has an empty query"


def test_dashboard_covers_the_required_panels() -> None:
    panels = [p for p in dashboard_panels(load_dashboard()) if p["type"] != "row"]
    for title, series in REQUIRED_PANELS.items():
        matching = [p for p in panels if title in p["title"].lower()]
        assert matching, f"no panel titled like {title!r}"
        queried = " ".join(t["expr"] for p in matching for t in p["targets"])
        assert series in queried, f"{title!r} does not query {series}"
    latency = next(p for p in panels if "score latency" in p["title"].lower())
    exprs = [t["expr"] for t in latency["targets"]]
    assert any("histogram_quantile(0.5," in e for e in exprs)
    assert any("histogram_quantile(0.99," in e for e in exprs)
    heat = [p for p in panels if "likelihood distribution" in p["title"].lower()]
    assert {"heatmap", "bargauge"} & {p["type"] for p in heat}
    assert all(t.get("format") == "heatmap" for p in heat for t in p["targets"])


def test_compose_file_is_plain_yaml_without_duplicate_keys() -> None:
    class Strict(yaml.SafeLoader):
        pass

    def no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(k) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"duplicate keys {dupes} at line {node.start_mark.line + 1}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, no_duplicates)
    for path in (COMPOSE, *GRAFANA.rglob("*.yml")):
        yaml.load(path.read_text(), Loader=Strict)  # a SafeLoader subclass
