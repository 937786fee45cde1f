"""Settings: SENSORWATCH_* environment, optional TOML file, precedence, one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import Settings, SettingsError, load_settings
from tests.support import build_artifacts, corrupt_artifact

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    s = load_settings()
    assert s.mqtt_url == "mqtt://127.0.0.1:1883"
    assert s.topic_readings == "sensors/+/readings"
    assert s.topic_prefix == "sensorwatch"
    assert s.model == "univariate"
    assert s.qos == 1
    assert s.publish_scores is False
    assert s.admin_token is None


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSORWATCH_MQTT_URL", "mqtts://user%40x:p%3Aw@broker.example:8884")
    monkeypatch.setenv("SENSORWATCH_MAX_BATCH", "17")
    monkeypatch.setenv("SENSORWATCH_PUBLISH_SCORES", "true")
    monkeypatch.setenv("SENSORWATCH_ADMIN_TOKEN", "zq-secret-42")
    monkeypatch.setenv("SENSORWATCH_TOPIC_READINGS", "plant/+/data")
    monkeypatch.setenv("SENSORWATCH_DEVICE_TTL_S", "")  # empty: never
    monkeypatch.setenv("MAX_BATCH", "99")  # no prefix: ignored
    s = load_settings()
    assert s.max_batch == 17
    assert s.publish_scores is True
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "zq-secret-42"
    assert "zq-secret-42" not in repr(s)  # secrets stay out of logs
    assert s.topic_readings == "plant/+/data"
    assert s.device_ttl_s is None
    assert s.broker() == {
        "host": "broker.example",
        "port": 8884,
        "tls": True,
        "username": "user@x",
        "password": "p:w",
    }


def test_separate_credentials_override_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSORWATCH_MQTT_USERNAME", "svc")
    monkeypatch.setenv("SENSORWATCH_MQTT_PASSWORD", "pw")
    b = load_settings(mqtt_url="mqtt://a:b@host").broker()
    assert (b["username"], b["password"], b["port"], b["tls"]) == ("svc", "pw", 1883, False)


def test_toml_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sensorwatch.toml"
    cfg.write_text('max_batch = 99\ntopic_prefix = "plant-a"\npublish_scores = true\nmax_wait_ms = 2.5\n')
    s = load_settings(config_file=cfg)
    assert (s.max_batch, s.topic_prefix, s.publish_scores, s.max_wait_ms) == (99, "plant-a", True, 2.5)
    # The file is only used for that call.
    assert load_settings().max_batch == Settings.model_fields["max_batch"].default


def test_environment_beats_toml_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "sensorwatch.toml"
    cfg.write_text('max_batch = 99\ntopic_prefix = "from-file"\n')
    monkeypatch.setenv("SENSORWATCH_MAX_BATCH", "7")
    s = load_settings(config_file=cfg)
    assert s.max_batch == 7
    assert s.topic_prefix == "from-file"
    assert load_settings(config_file=cfg, max_batch=3).max_batch == 3


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(config_file=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("SENSORWATCH_MQTT_URL", "http://x", "SENSORWATCH_MQTT_URL"),
        ("SENSORWATCH_MQTT_URL", "mqtt://", "SENSORWATCH_MQTT_URL"),
        ("SENSORWATCH_MAX_BATCH", "0", "SENSORWATCH_MAX_BATCH"),
        ("SENSORWATCH_MAX_BATCH", "many", "SENSORWATCH_MAX_BATCH"),
        ("SENSORWATCH_MAX_WAIT_MS", "-1", "SENSORWATCH_MAX_WAIT_MS"),
        ("SENSORWATCH_TOPIC_READINGS", "sensors/readings", "SENSORWATCH_TOPIC_READINGS"),
        ("SENSORWATCH_TOPIC_READINGS", "sensors/+/+/readings", "SENSORWATCH_TOPIC_READINGS"),
        ("SENSORWATCH_TOPIC_READINGS", "sensors/+/#", "SENSORWATCH_TOPIC_READINGS"),
        ("SENSORWATCH_MQTT_CLIENT_ID", "has space", "SENSORWATCH_MQTT_CLIENT_ID"),
        ("SENSORWATCH_QOS", "3", "SENSORWATCH_QOS"),
        ("SENSORWATCH_MQTT_PROTOCOL", "4", "SENSORWATCH_MQTT_PROTOCOL"),
        ("SENSORWATCH_CALIBRATOR", "magic", "SENSORWATCH_CALIBRATOR"),
        ("SENSORWATCH_PUBLISH_SCORES", "perhaps", "SENSORWATCH_PUBLISH_SCORES"),
        ("SENSORWATCH_MAX_PAYLOAD_BYTES", "10", "SENSORWATCH_MAX_PAYLOAD_BYTES"),
    ],
)
def test_invalid_environment_value_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"invalid setting {named}: "), msg


def test_invalid_toml_value_and_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("max_batch = 0\n")
    with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_MAX_BATCH: "):
        load_settings(config_file=cfg)
    cfg.write_text("max_bacth = 10\n")  # a typo must not be silently ignored
    with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_MAX_BACTH: "):
        load_settings(config_file=cfg)


def test_client_certificate_needs_its_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="mqtt_cert_file and mqtt_key_file") as info:
        load_settings(mqtt_cert_file=tmp_path / "c.pem")
    assert "\n" not in str(info.value)


def test_create_app_needs_an_admin_token_unless_insecure(tmp_path: Path) -> None:
    s = load_settings(mqtt_url="", state_dir=tmp_path, models_dir=tmp_path)
    with pytest.raises(SettingsError, match="SENSORWATCH_ADMIN_TOKEN") as info:
        create_app(s)
    assert "\n" not in str(info.value)
    assert create_app(s, insecure_no_auth=True) is not None
    assert create_app(load_settings(mqtt_url="", admin_token="t", state_dir=tmp_path)) is not None


def test_create_app_refuses_a_model_that_does_not_load(tmp_path: Path) -> None:
    build_artifacts(tmp_path)
    corrupt_artifact(tmp_path, "uni", "2")
    for ref in ("nope", "uni/9", "uni/2", "../x"):
        s = load_settings(mqtt_url="", admin_token="t", state_dir=tmp_path, models_dir=tmp_path, model=ref)
        with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_MODEL: ") as info:
            create_app(s)
        assert "\n" not in str(info.value)
    # The default model falls back to the built-in one when none is shipped.
    assert create_app(load_settings(mqtt_url="", admin_token="t", models_dir=tmp_path / "none")) is not None


def _serve(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1", *args],
        env={**clean, "SENSORWATCH_STATE_DIR": str(tmp_path), "SENSORWATCH_MODELS_DIR": str(tmp_path), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SENSORWATCH_MQTT_URL": "http://x"}, "SENSORWATCH_MQTT_URL"),
        ({"SENSORWATCH_MAX_BATCH": "0"}, "SENSORWATCH_MAX_BATCH"),
        ({}, "SENSORWATCH_ADMIN_TOKEN"),  # no token and no --insecure-no-auth
        ({"SENSORWATCH_ADMIN_TOKEN": "t", "SENSORWATCH_MODEL": "nope"}, "SENSORWATCH_MODEL"),
    ],
)
def test_serve_refuses_invalid_settings_with_exit_2(tmp_path: Path, env: dict[str, str], named: str) -> None:
    proc = _serve(tmp_path, env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"sensorwatch: invalid setting {named}: "), lines[0]
    assert proc.stdout == ""


def test_serve_refuses_a_missing_config_file(tmp_path: Path) -> None:
    proc = _serve(tmp_path, {}, "--insecure-no-auth", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "missing.toml: not found" in proc.stderr


def test_detection_settings_reach_the_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.metrics import Metrics
    from service.pipeline import Engine

    monkeypatch.setenv("SENSORWATCH_SEASONAL_CHECK", "false")
    monkeypatch.setenv("SENSORWATCH_POINT_LIKELIHOOD", "true")
    monkeypatch.setenv("SENSORWATCH_LIKELIHOOD_THRESHOLD", "0.99999")
    cfg = Engine(load_settings(model="builtin"), Metrics(mqtt=False)).scorer.config
    assert (cfg.seasonal_check, cfg.point_likelihood, cfg.likelihood_threshold) == (False, True, 0.99999)
    layout = Engine(load_settings(model="builtin"), Metrics(mqtt=False)).scorer.layout
    assert "seasonal_check.mean" not in layout.fields
    monkeypatch.setenv("SENSORWATCH_LIKELIHOOD_THRESHOLD", "1.5")
    with pytest.raises(SettingsError, match="SENSORWATCH_LIKELIHOOD_THRESHOLD"):
        load_settings()


def test_scorer_settings_reach_the_engine_and_bad_ones_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SENSORWATCH_SCORER takes any ScorerConfig field, as ``--scorer`` does elsewhere."""
    from service.engine import Engine
    from service.metrics import Metrics

    for bad in ("no_such=1", "spike_z=-1", "spike_z"):
        monkeypatch.setenv("SENSORWATCH_SCORER", bad)
        with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_SCORER: ") as info:
            load_settings()
        assert "\n" not in str(info.value)
    monkeypatch.setenv("SENSORWATCH_SCORER", "spike_z=7, range_margin=none,calibrator=threshold")
    s = load_settings(model="builtin", mqtt_url="", state_dir=tmp_path, calibrator="likelihood")
    cfg = Engine(s, Metrics(mqtt=False)).scorer.config
    assert (cfg.spike_z, cfg.range_margin, cfg.calibrator) == (7.0, None, "threshold")  # it wins
    assert cfg.seasonal_check is s.seasonal_check  # the dedicated settings still apply


def test_score_csv_takes_scorer_settings(tmp_path: Path) -> None:
    csv_in = tmp_path / "in.csv"
    rows = [f"{1767225600 + 60 * i},{20.0 + (i % 5) * 0.1 + (15.0 if i == 200 else 0.0)}" for i in range(300)]
    csv_in.write_text("timestamp,temp\n" + "\n".join(rows) + "\n")
    out = {}
    for name, extra in (("on", []), ("off", ["--scorer", "spike_z=none"])):
        path = tmp_path / f"{name}.csv"
        cmd = [sys.executable, "-m", "sensorwatch.cli", "score-csv", str(csv_in), "--out", str(path), *extra]
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=120)
        header, *lines = path.read_text().splitlines()
        col = header.split(",").index("is_anomaly")
        out[name] = [line.split(",")[col] for line in lines]
    assert out["on"][200] in ("True", "true", "1")
    assert out["off"][200] not in ("True", "true", "1")
    bad = subprocess.run(
        [sys.executable, "-m", "sensorwatch.cli", "score-csv", str(csv_in), "--scorer", "no_such=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "unknown scorer setting 'no_such'" in bad.stderr


@pytest.mark.parametrize("token", ["", "   ", "\xa0", "tok en", "tok\tn", "tök"])
def test_an_empty_whitespace_or_non_ascii_admin_token_is_refused(token: str) -> None:
    with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_ADMIN_TOKEN: ") as info:
        load_settings(admin_token=token)
    assert "\n" not in str(info.value)


def test_secrets_from_files_docker_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text("s3cret-from-file\n")
    password.write_text("pass word\n")
    monkeypatch.setenv("SENSORWATCH_ADMIN_TOKEN_FILE", str(token))
    monkeypatch.setenv("SENSORWATCH_MQTT_PASSWORD_FILE", str(password))
    s = load_settings()
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "s3cret-from-file"
    assert s.broker()["password"] == "pass word"
    monkeypatch.setenv("SENSORWATCH_ADMIN_TOKEN", "other")
    with pytest.raises(SettingsError, match="exclusive"):
        load_settings()
    monkeypatch.delenv("SENSORWATCH_ADMIN_TOKEN")
    token.write_text(" \n")
    with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_ADMIN_TOKEN_FILE: "):
        load_settings()
    monkeypatch.setenv("SENSORWATCH_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match=r"^invalid setting SENSORWATCH_ADMIN_TOKEN_FILE: .*missing"):
        load_settings()


def test_serve_refuses_an_empty_token(tmp_path: Path) -> None:
    proc = _serve(tmp_path, {"SENSORWATCH_ADMIN_TOKEN": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("sensorwatch: invalid setting SENSORWATCH_ADMIN_TOKEN: ")
    assert "must not be empty" in proc.stderr


def test_insecure_no_auth_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    s = load_settings(mqtt_url="", state_dir=tmp_path, model="builtin")
    with (
        caplog.at_level("WARNING", logger="sensorwatch.service"),
        TestClient(create_app(s, insecure_no_auth=True)),
    ):
        pass
    assert any("--insecure-no-auth" in r.getMessage() for r in caplog.records)


def test_http_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Header and body timeouts and the connection cap (service.http_server): defaults, environment,
    and a one-line refusal of a value that would disable them."""
    s = load_settings()
    assert (s.http_header_timeout_s, s.http_body_timeout_s, s.http_max_connections) == (10.0, 30.0, 1000)
    monkeypatch.setenv("SENSORWATCH_HTTP_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SENSORWATCH_HTTP_BODY_TIMEOUT_S", "7")
    monkeypatch.setenv("SENSORWATCH_HTTP_MAX_CONNECTIONS", "64")
    s = load_settings()
    assert (s.http_header_timeout_s, s.http_body_timeout_s, s.http_max_connections) == (2.5, 7.0, 64)
    for name, bad in (
        ("http_header_timeout_s", 0),
        ("http_body_timeout_s", -1),
        ("http_max_connections", 0),
        ("http_max_connections", "many"),
    ):
        with pytest.raises(SettingsError, match=f"invalid setting SENSORWATCH_{name.upper()}: "):
            load_settings(**{name: bad})


def test_unusable_tls_files_refuse_the_start_in_one_line(tmp_path: Path) -> None:
    """Loaded at start (paho would fail later, in its thread, with a traceback)."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    base = {"admin_token": "t" * 32, "mqtt_url": "mqtts://127.0.0.1:8883"}
    with pytest.raises(SettingsError, match=r"^invalid settings: SENSORWATCH_MQTT_CA_FILE: .*missing\.pem"):
        load_settings(**base, mqtt_ca_file=tmp_path / "missing.pem")
    with pytest.raises(SettingsError, match=r"SENSORWATCH_MQTT_CA_FILE: .*not a CA bundle"):
        load_settings(**base, mqtt_ca_file=junk)
    with pytest.raises(SettingsError, match=r"SENSORWATCH_MQTT_CERT_FILE / _KEY_FILE: .*not a certificate"):
        load_settings(**base, mqtt_cert_file=junk, mqtt_key_file=junk)
