"""TLS and passwords (issue #13 item 8) against a real Mosquitto.

The broker has two listeners: the plain anonymous one of :class:`Broker` (for the test's own
publisher and collector) and a TLS one that requires a client certificate signed by the test CA
(``require_certificate``) and a user name with its password (``password_file``). Certificates are
made here with the ``openssl`` CLI: a CA, a server certificate for 127.0.0.1/localhost and a client
certificate signed by it, and a second CA nobody trusts (with a client certificate of its own).

* The service connects with ``mqtts://``, its CA, client certificate + key and a password file, and
  scores readings published through that broker.
* A wrong password, a broker certificate the service does not trust, and a client certificate the
  broker does not trust each give ONE log line saying what is wrong — through the intake process
  (the default: the child's lines must reach the service's log) and with ``MQTT_INTAKE=thread`` —
  while the service keeps retrying with its backoff (the broker logs every attempt), stays alive,
  and answers 503 on ``/readyz``. Once the broker accepts the password (a reloaded password file),
  the retrying service connects by itself and scores.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from service.mqtt import MqttAdapter
from service.settings import load_settings
from tests.e2e.harness import Broker, Collector, Names, Publisher, free_port, new_names
from tests.e2e.procs import ServiceProcess
from tests.e2e.test_mqtt import DT, T0, reading
from tests.support import ADMIN_TOKEN, wait_until

USER = "sensorwatch"
PASSWORD = "pa55 w0rd:@/ü"  # spaces and URL characters: it never goes through a URL
WRONG_PASSWORD = "not-the-password"
#: Marks the service's connection-failure lines (service.mqtt.RETRYING ends each of them).
RETRYING = "retrying (logged again only if the cause changes)"


# -------------------------------------------------------------------------------------------- PKI
@dataclass(frozen=True)
class Pki:
    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(d: Path) -> Pki:
    """CAs ``ca`` and ``other-ca``; ``server`` (127.0.0.1, localhost) and ``client`` signed by ``ca``,
    ``rogue-client`` by ``other-ca``. EC P-256 keys: the whole set takes ~0.2 s."""
    d.mkdir(parents=True, exist_ok=True)
    pki = Pki(d)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", str(pki.key(ca)), "-out", str(pki.crt(ca)), "-days", "2",
            "-subj", f"/CN=sensorwatch test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    leaves = {
        "server": ("ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        "client": ("ca", "extendedKeyUsage=clientAuth\n"),
        "rogue-client": ("other-ca", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (ca, ext) in leaves.items():
        csr, extfile = d / f"{name}.csr", d / f"{name}.ext"
        extfile.write_text(ext)
        _openssl("req", *ec, "-keyout", str(pki.key(name)), "-out", str(csr), "-subj", f"/CN={name}")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(pki.crt(ca)), "-CAkey", str(pki.key(ca)),
            "-CAcreateserial", "-out", str(pki.crt(name)), "-days", "2", "-extfile", str(extfile),
        )  # fmt: skip
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -------------------------------------------------------------------------------------------- broker
@dataclass
class TlsBroker:
    broker: Broker
    tls_port: int
    password_file: Path

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def set_password(self, password: str) -> None:
        """Write the broker's password file for USER (read at start and on :meth:`Broker.reload`)."""
        subprocess.run(
            ["mosquitto_passwd", "-b", "-c", str(self.password_file), USER, password],
            check=True,
            capture_output=True,
        )

    def count(self, text: str) -> int:
        """Lines of the broker's log that contain ``text``."""
        return sum(text in line for line in self.broker.log_text().splitlines())


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[TlsBroker]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    tls_port = free_port()
    password_file = workdir / "passwords"
    broker = Broker(
        workdir,
        per_listener_settings=True,
        extra_config=[
            f"listener {tls_port} 127.0.0.1",
            f"cafile {pki.crt('ca')}",  # clients' certificates are checked against it
            f"certfile {pki.crt('server')}",
            f"keyfile {pki.key('server')}",
            "require_certificate true",
            "allow_anonymous false",
            f"password_file {password_file}",
        ],
    )
    tls = TlsBroker(broker, tls_port, password_file)
    tls.set_password(PASSWORD)
    broker.start()
    try:
        yield tls
    finally:
        broker.stop()


# -------------------------------------------------------------------------------------------- service
def tls_env(
    names: Names,
    root: Path,
    broker: TlsBroker,
    pki: Pki,
    intake: str = "process",
    ca: str = "ca",
    client: str = "client",
) -> dict[str, str]:
    """The service on the TLS listener with mutual TLS, USER and PASSWORD (from a secrets file)."""
    secret = root / "mqtt-password"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(PASSWORD + "\n", encoding="utf-8")  # as Docker secrets: a trailing newline
    return {
        "SENSORWATCH_MQTT_URL": broker.url,
        "SENSORWATCH_MQTT_CA_FILE": str(pki.crt(ca)),
        "SENSORWATCH_MQTT_CERT_FILE": str(pki.crt(client)),
        "SENSORWATCH_MQTT_KEY_FILE": str(pki.key(client)),
        "SENSORWATCH_MQTT_USERNAME": USER,
        "SENSORWATCH_MQTT_PASSWORD_FILE": str(secret),
        "SENSORWATCH_MQTT_INTAKE": intake,
        "SENSORWATCH_MQTT_CLIENT_ID": names.client_id,
        "SENSORWATCH_TOPIC_READINGS": names.readings,
        "SENSORWATCH_TOPIC_PREFIX": names.prefix,
        "SENSORWATCH_STATE_DIR": str(root / "state"),
        "SENSORWATCH_MODEL": "builtin",
        "SENSORWATCH_PUBLISH_SCORES": "true",
    }


def failure_lines(svc: ServiceProcess) -> list[str]:
    return svc.log_lines(RETRYING)


def publish_and_score(broker: Broker, names: Names, device: str, n: int) -> None:
    """Publish ``n`` readings through the broker's plain listener; every one must come back scored."""
    collector = Collector(names.prefix, broker.host, broker.port)
    publisher = Publisher(broker.host, broker.port)
    try:
        for i in range(n):
            publisher.publish(names.topic(device), reading(i, 20.0 + i % 3))
        publisher.wait_acked()
        wait_until(lambda: collector.count("scores") >= n, 20, f"{n} scores")
        time.sleep(0.2)  # a duplicate would arrive right behind
        scores = collector.docs("scores")
    finally:
        publisher.close()
        collector.close()
    assert sorted((s["device_id"], s["ts"]) for s in scores) == [(device, T0 + i * DT) for i in range(n)]
    assert all(s["accepted"] for s in scores)


# -------------------------------------------------------------------------------------------- tests
def test_mutual_tls_and_a_password_file_readings_are_scored(
    names: Names, tmp_path: Path, tls_broker: TlsBroker, pki: Pki
) -> None:
    with ServiceProcess(tls_env(names, tmp_path, tls_broker, pki), tmp_path / "logs") as svc:
        svc.start()
        svc.wait_ready(40)
        publish_and_score(tls_broker.broker, names, "tls-1", 5)
        assert svc.get("/readyz").status_code == 200
        assert svc.stop() == 0
    # It came in on the TLS listener, as USER (what mosquitto logs for a CONNECT it accepted).
    assert tls_broker.count(f"on port {tls_broker.tls_port}.") >= 1
    assert tls_broker.count(f"as {names.client_id} (") >= 1
    assert tls_broker.count(f"u'{USER}')") >= 1
    assert failure_lines(svc) == [], svc.log_tail()
    assert "Traceback" not in svc.log_text()


#: Each refused service: its env overrides, the line it must log (once), and what the broker logs on
#: every attempt (proof that the service kept retrying while it said nothing more).
REFUSALS = {
    "wrong-password": (
        {"SENSORWATCH_MQTT_PASSWORD": WRONG_PASSWORD, "SENSORWATCH_MQTT_PASSWORD_FILE": ""},
        "broker refused the connection: Not authorized (check the user name and password)",
        "disconnected, not authorised",
    ),
    "untrusted-server": (
        {"SENSORWATCH_MQTT_CA_FILE": "{other-ca}"},
        "TLS: broker certificate not trusted (self-signed certificate in certificate chain; "
        "checked against CA file {other-ca})",
        "alert unknown ca",
    ),
    "untrusted-client": (
        {"SENSORWATCH_MQTT_CERT_FILE": "{rogue.crt}", "SENSORWATCH_MQTT_KEY_FILE": "{rogue.key}"},
        "broker closed the connection before answering CONNECT "
        "(does it accept the client certificate {rogue.crt}?)",
        "certificate verify failed",
    ),
}


@pytest.mark.parametrize("intake", ["process", "thread"])
def test_refusals_are_logged_once_retried_and_a_fixed_broker_is_connected(
    intake: str, tmp_path: Path, tls_broker: TlsBroker, pki: Pki
) -> None:
    paths = {
        "{other-ca}": str(pki.crt("other-ca")),
        "{rogue.crt}": str(pki.crt("rogue-client")),
        "{rogue.key}": str(pki.key("rogue-client")),
    }

    def fill(text: str) -> str:
        for k, v in paths.items():
            text = text.replace(k, v)
        return text

    prefix = f"MQTT 127.0.0.1:{tls_broker.tls_port}: "
    logger = "sensorwatch.mqtt[intake]" if intake == "process" else "sensorwatch.mqtt"
    svcs: dict[str, ServiceProcess] = {}
    names: dict[str, Names] = {}
    try:
        for case, (overrides, _, _) in REFUSALS.items():  # all at once: each start takes seconds
            names[case] = new_names()
            env = tls_env(names[case], tmp_path / case, tls_broker, pki, intake=intake)
            env.update({k: fill(v) for k, v in overrides.items()})
            svcs[case] = ServiceProcess(env, tmp_path / "logs", name=case)
            svcs[case].start()

        def check_refused(case: str, attempts: int) -> None:
            """One line, while the broker saw ``attempts`` (backoff 1 s, doubling: at 0, 1, 3 s…)."""
            svc, (_, line, per_attempt) = svcs[case], REFUSALS[case]
            wait_until(lambda: failure_lines(svc), 40, f"{case}: the failure's log line")
            wait_until(lambda: tls_broker.count(per_attempt) >= attempts, 20, f"{case}: {attempts} attempts")
            lines = failure_lines(svc)
            assert len(lines) == 1, f"{case}: {lines}"
            assert lines[0].endswith(prefix + fill(line) + "; " + RETRYING), lines[0]
            assert f" ERROR {logger}: " in lines[0], lines[0]  # the child's line is in the service's log
            assert "Traceback" not in svc.log_text(), svc.log_tail()
            assert svc.running, f"{case} exited:\n{svc.log_tail()}"
            r = svc.get("/readyz")
            assert r.status_code == 503, r.text
            assert r.json()["mqtt_connected"] is False, r.text
            assert svc.get("/healthz").status_code == 200

        # The wrong password first: two attempts, one line; then the broker is fixed (it accepts the
        # service's password now), before the next attempt, 2 s later.
        check_refused("wrong-password", 2)
        # Backed off, not in a tight loop (the intake process used to retry a refused CONNECT at once).
        assert tls_broker.count("disconnected, not authorised") <= 3
        tls_broker.set_password(WRONG_PASSWORD)
        tls_broker.broker.reload()
        check_refused("untrusted-server", 3)
        check_refused("untrusted-client", 3)

        # The service, still retrying, connects by itself and scores; it said nothing more meanwhile.
        fixed = svcs["wrong-password"]
        fixed.wait_ready(20)
        publish_and_score(tls_broker.broker, names["wrong-password"], "fixed-1", 3)
        assert len(failure_lines(fixed)) == 1, failure_lines(fixed)
        assert fixed.log_lines(f"MQTT connected to 127.0.0.1:{tls_broker.tls_port} (first)")

        for svc in svcs.values():  # a graceful stop is prompt, while retrying too
            assert svc.proc is not None
            svc.proc.terminate()
        for case, svc in svcs.items():
            assert svc.wait_exit(30) == 0, f"{case}:\n{svc.log_tail()}"
            assert len(failure_lines(svc)) == 1, f"{case}: {failure_lines(svc)}"
            assert "Traceback" not in svc.log_text(), svc.log_tail()
    finally:
        for svc in svcs.values():
            svc.kill9()


def test_a_failure_is_logged_again_only_when_its_cause_changes_or_after_a_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The once-per-cause rule itself, through paho's callbacks (no broker: the e2e tests above
    cannot wait for a cause to change within their time)."""
    settings = load_settings(
        mqtt_url="mqtts://127.0.0.1:8883", mqtt_username=USER, mqtt_password=WRONG_PASSWORD,
        admin_token=ADMIN_TOKEN, state_dir="",
    )  # fmt: skip
    adapter = MqttAdapter(settings, lambda msg: None)
    c = adapter.client
    refused = ReasonCode(PacketTypes.CONNACK, identifier=135)
    lost = ReasonCode(PacketTypes.DISCONNECT, identifier=128)

    def refusal() -> None:  # what paho calls for an attempt whose CONNECT is refused
        c.on_pre_connect(c, None)
        c.on_connect(c, None, None, refused, None)
        c.on_disconnect(c, None, None, lost, None)

    def unreachable() -> None:  # paho calls on_connect_fail inside its ``except OSError``
        c.on_pre_connect(c, None)
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            c.on_connect_fail(c, None)

    with caplog.at_level(logging.INFO, logger="sensorwatch.mqtt"):
        for attempt in (refusal, refusal, refusal, unreachable, unreachable, refusal):
            attempt()
        # Connected (CONNACK, then the SUBACK that makes it ready), lost, refused again.
        c.on_pre_connect(c, None)
        c.on_connect(c, None, None, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
        c.on_subscribe(c, None, adapter._subscribe_mid, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
        c.on_disconnect(c, None, None, lost, None)
        refusal()
        refusal()
    failures = [r.getMessage() for r in caplog.records if RETRYING in r.getMessage()]
    bad = (
        "MQTT 127.0.0.1:8883: broker refused the connection: "
        "Not authorized (check the user name and password)"
    )
    down = "MQTT 127.0.0.1:8883: broker unreachable (Connection refused)"
    assert failures == [f"{m}; {RETRYING}" for m in (bad, down, bad, bad)]
    assert [r.levelname for r in caplog.records if RETRYING in r.getMessage()] == [
        "ERROR", "WARNING", "ERROR", "ERROR",
    ]  # fmt: skip
