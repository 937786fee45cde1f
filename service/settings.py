"""Service settings: environment (``SENSORWATCH_*``), an optional TOML file, then defaults.

An invalid value refuses to start with one line naming the setting (:func:`load_settings`).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sensorwatch.scoring.config import CalibratorName, ScorerConfig, config_with

_TOML_FILE: Path | None = None


class Settings(BaseSettings):
    """Every setting of the service (env var = ``SENSORWATCH_`` + the upper-case name)."""

    model_config = SettingsConfigDict(env_prefix="SENSORWATCH_", extra="forbid", frozen=True)

    # --- MQTT ---------------------------------------------------------------------------------------
    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="Broker URL: mqtt://host:port or mqtts://host:port (TLS); user:password@ allowed. "
        "Empty: no MQTT (REST only).",
    )
    mqtt_username: str | None = Field(None, description="Broker user (overrides the URL's).")
    mqtt_password: SecretStr | None = Field(None, description="Broker password (overrides the URL's).")
    mqtt_password_file: Path | None = Field(
        None,
        description="File holding the broker password (Docker secrets; one trailing newline ignored); "
        "exclusive with SENSORWATCH_MQTT_PASSWORD.",
    )
    mqtt_accept_retained: bool = Field(
        False,
        description="Score retained messages on the readings topic. Off: they are rejected 'retained' "
        "(counted, dead-lettered, acked), since the broker replays them on every (re)subscribe.",
    )
    mqtt_ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (default: system CAs).")
    mqtt_cert_file: Path | None = Field(None, description="Client certificate for mqtts:// (mutual TLS).")
    mqtt_key_file: Path | None = Field(None, description="Client key for mqtts://.")
    mqtt_client_id: str = Field("sensorwatch", description="Stable client id: the persistent session's key.")
    mqtt_protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    mqtt_session_expiry_s: int = Field(
        86_400,
        ge=0,
        description="How long the broker keeps the session (and queued QoS1 readings) while "
        "the service is away (MQTT 5; 3.1.1 keeps it until a clean session).",
    )
    mqtt_keepalive_s: int = Field(30, ge=5, description="MQTT keepalive.")
    mqtt_intake: Literal["process", "thread"] = Field(
        "process",
        description="Where paho and the JSON parsing run: 'process' (a child process; the scorer keeps "
        "this one's GIL: ~2× the one-reading throughput on 2 cores) or 'thread' (in this process).",
    )
    topic_readings: str = Field(
        "sensors/+/readings", description="Subscription; the single '+' segment is the device id."
    )
    topic_prefix: str = Field(
        "sensorwatch",
        description="Outputs: PREFIX/anomalies/ID, PREFIX/scores/ID, PREFIX/deadletter, PREFIX/status.",
    )
    qos: Literal[0, 1, 2] = Field(1, description="QoS of the subscription and of published events.")
    publish_scores: bool = Field(False, description="Publish every result on PREFIX/scores/ID.")
    # --- cluster mode (NATS JetStream) ---------------------------------------------------------------
    nats_url: str = Field(
        "",
        description="Cluster mode: comma-separated nats://host:port servers of a NATS JetStream cluster; "
        "the MQTT settings are then unused (devices publish to the NATS nodes' MQTT listeners). "
        "Empty: single-node mode (MQTT broker + local state).",
    )
    partitions: int = Field(
        12, ge=1, le=1024, description="Cluster mode: partitions of the readings stream (by device id)."
    )
    group: str = Field(
        "sensorwatch",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Cluster mode: the workers that share the partitions (their leases and checkpoints).",
    )
    worker_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Cluster mode: this worker's name (default: host name and process id).",
    )
    lease_ttl_s: float = Field(
        3.0,
        ge=1.0,
        le=600,
        description="Cluster mode: a partition's lease lapses this long after its owner last renewed it "
        "(renewed every third of it); a dead worker's partitions are taken over after it.",
    )
    checkpoint_interval_s: float = Field(
        5.0, gt=0, description="Cluster mode: how often each owned partition's state is checkpointed."
    )
    # --- model and state ----------------------------------------------------------------------------
    model: str = Field(
        "univariate",
        description="Model NAME[/VERSION] under MODELS_DIR (built-in fallback when the default is absent); "
        "'builtin' selects the built-in persistence model.",
    )
    models_dir: Path = Field(
        Path("models"), description="Where model artifacts are loaded from (only there)."
    )
    state_dir: Path | None = Field(
        Path("state"),
        description="Device state: snapshots and the write-ahead log (recovered on start); empty: none.",
    )
    snapshot_interval_s: float = Field(300.0, ge=0, description="Periodic state snapshot; 0: only on stop.")
    wal_sync: Literal["fsync", "none", "off"] = Field(
        "fsync",
        description="Write-ahead log under STATE_DIR/wal: 'fsync' (every outcome is published and acked "
        "only once its batch is on disk: survives a host crash), 'none' (written, not synced: survives "
        "a kill of the process), 'off' (no log: a crash loses the state since the last snapshot).",
    )
    wal_snapshot_mb: float = Field(
        256.0, gt=0, description="A snapshot is also taken once the log has grown this much since the last."
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="Threads torch and the scoring kernel may use for a scorer step (0: their defaults). "
        "One leaves the other core to the MQTT intake and the broker.",
    )
    calibrator: CalibratorName = Field("likelihood", description="Decision rule (see ScorerConfig).")
    likelihood_threshold: float = Field(
        0.9999,
        gt=0,
        lt=1,
        description="Anomaly cut of the likelihood calibrator: 0.9999 = a surprise of 4 decimal digits, "
        "0.99999 = 5 (fewer, surer alerts).",
    )
    seasonal_check: bool = Field(
        True, description="Compare each reading with the same hour one day earlier (see ScorerConfig)."
    )
    point_likelihood: bool = Field(
        False,
        description="Also score each reading's own residual: catches in-range spikes on sensors with "
        "well-behaved noise, floods heavy-tailed series with alerts.",
    )
    scorer: str = Field(
        "",
        description="More scorer settings, comma-separated KEY=VALUE as `--scorer` of score-csv and "
        "evaluate (any ScorerConfig field, e.g. 'spike_z=7,range_margin=none'); they win over the "
        "settings above.",
    )
    # --- security and limits ------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for admin endpoints; required unless --insecure-no-auth. Printable "
        "ASCII without spaces; compared byte for byte (in constant time) with the header's.",
    )
    admin_token_file: Path | None = Field(
        None,
        description="File holding the admin token (Docker secrets; one trailing newline ignored); "
        "exclusive with SENSORWATCH_ADMIN_TOKEN.",
    )
    max_batch: int = Field(
        16_384,
        ge=1,
        le=1_000_000,
        description="Most readings per scorer step (a batch takes what is queued, up to this).",
    )
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="Longest a reading waits for its batch.")
    max_queue: int = Field(100_000, ge=1, description="Readings waiting to be scored (backpressure beyond).")
    max_devices: int = Field(100_000, ge=1, description="Devices kept in memory (LRU eviction beyond).")
    device_ttl_s: float | None = Field(None, gt=0, description="Evict devices idle this long; empty: never.")
    max_payload_bytes: int = Field(65_536, ge=64, description="Largest MQTT payload accepted.")
    max_future_s: float = Field(
        900.0,
        gt=0,
        description="Readings stamped more than this many seconds ahead of the service's wall clock are "
        "rejected (ts_out_of_range), so one far-future timestamp cannot make its device refuse every "
        "real reading as out_of_order; 15 minutes, as Amazon Timestream's limit.",
    )
    max_request_bytes: int = Field(4 << 20, ge=1024, description="Largest REST request body accepted.")
    max_request_readings: int = Field(
        10_000, ge=1, description="Most readings in one REST request or message."
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A connection whose request line and headers are not complete this long after it "
        "opened (or after the first byte of a keep-alive request) is closed (408 once bytes arrived).",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A request body that stalls this long between two chunks gets 408 and the "
        "connection is closed.",
    )
    http_max_connections: int = Field(
        1000,
        gt=0,
        le=1_000_000,
        description="Open HTTP connections. Beyond: a new connection closes the oldest idle one (waiting "
        "for a request head), or gets 503 when all are mid-request. Lowered, with one log line, when "
        "the file-descriptor limit is too low for it.",
    )

    @field_validator(
        "state_dir",
        "device_ttl_s",
        "mqtt_ca_file",
        "mqtt_cert_file",
        "mqtt_key_file",
        "admin_token_file",
        "mqtt_password_file",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip() == "" else v

    @field_validator("mqtt_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and urlsplit(v).scheme not in ("mqtt", "mqtts"):
            raise ValueError("must start with mqtt:// or mqtts://")
        if v and not urlsplit(v).hostname:
            raise ValueError("needs a host")
        return v

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, v: str) -> str:
        for server in filter(None, (part.strip() for part in v.split(","))):
            u = urlsplit(server)
            if u.scheme not in ("nats", "tls") or not u.hostname:
                raise ValueError(f"{server!r}: each server must be nats://host:port or tls://host:port")
        return v

    @property
    def nats_servers(self) -> list[str]:
        return [part.strip() for part in self.nats_url.split(",") if part.strip()]

    @field_validator("topic_readings")
    @classmethod
    def _topic(cls, v: str) -> str:
        if v.split("/").count("+") != 1 or "#" in v:
            raise ValueError("needs exactly one '+' segment (the device id) and no '#'")
        return v

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        try:
            config_with(scorer_items(v))  # an unknown key or a bad value is refused at start
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        return v

    @field_validator("admin_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_token(v.get_secret_value())
        return v

    @field_validator("admin_token_file")
    @classmethod
    def _token_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            check_token(read_secret(v))
        return v

    @field_validator("mqtt_password_file")
    @classmethod
    def _password_file(cls, v: Path | None) -> Path | None:
        if v is not None and not read_secret(v):
            raise ValueError(f"{v} is empty")
        return v

    @model_validator(mode="after")
    def _secret_files(self) -> Settings:
        """The *_FILE settings fill their secret (read once more: validated above)."""
        for value, file in (("admin_token", "admin_token_file"), ("mqtt_password", "mqtt_password_file")):
            path = getattr(self, file)
            if path is None:
                continue
            if getattr(self, value) is not None:
                raise ValueError(f"SENSORWATCH_{value.upper()} and SENSORWATCH_{file.upper()} are exclusive")
            object.__setattr__(self, value, SecretStr(read_secret(path)))  # frozen: set once, here
        return self

    @field_validator("mqtt_client_id")
    @classmethod
    def _client_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v):
            raise ValueError("1-64 characters of letters, digits, . _ -")
        return v

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        """The TLS files are loaded once here, so that a missing or unreadable CA, certificate or key
        refuses the start in one line (paho would find out later, with a traceback, in its thread)."""
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError("mqtt_cert_file and mqtt_key_file go together")
        if self.mqtt_ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(self.mqtt_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"SENSORWATCH_MQTT_CA_FILE: {self.mqtt_ca_file} is not a CA bundle ({exc})"
                ) from None
        if self.mqtt_cert_file is not None and self.mqtt_key_file is not None:
            try:
                ssl.create_default_context().load_cert_chain(
                    str(self.mqtt_cert_file), str(self.mqtt_key_file)
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"SENSORWATCH_MQTT_CERT_FILE / _KEY_FILE: {self.mqtt_cert_file} and "
                    f"{self.mqtt_key_file} are not a certificate and its key ({exc})"
                ) from None
        return self

    # --- derived ------------------------------------------------------------------------------------
    def broker(self) -> dict[str, Any]:
        """Host, port, tls, username, password from the URL and the separate settings."""
        u = urlsplit(self.mqtt_url)
        tls = u.scheme == "mqtts"
        password = self.mqtt_password.get_secret_value() if self.mqtt_password else None
        return {
            "host": u.hostname,
            "port": u.port or (8883 if tls else 1883),
            "tls": tls,
            "username": self.mqtt_username or (unquote(u.username) if u.username else None),
            "password": password or (unquote(u.password) if u.password else None),
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _TOML_FILE is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_TOML_FILE))
        return tuple(sources)


def scorer_items(text: str) -> list[str]:
    """``KEY=VALUE`` items of the ``scorer`` setting.

    >>> scorer_items("spike_z=7, range_margin=none"), scorer_items("")
    (['spike_z=7', 'range_margin=none'], [])
    """
    return [item.strip() for item in text.split(",") if item.strip()]


def scorer_config(settings: Settings) -> ScorerConfig:
    """The scorer's configuration these settings describe (the service's, a cluster worker's)."""
    return config_with(
        scorer_items(settings.scorer),
        calibrator=settings.calibrator,
        likelihood_threshold=settings.likelihood_threshold,
        seasonal_check=settings.seasonal_check,
        point_likelihood=settings.point_likelihood,
        max_devices=settings.max_devices,
        device_ttl_s=settings.device_ttl_s,
        max_future_s=settings.max_future_s,
    )


class SettingsError(ValueError):
    """Invalid configuration; the message is one line naming the setting."""


def check_token(token: str) -> None:
    """An admin token is printable ASCII without spaces (an HTTP header carries it byte for byte):
    an empty or whitespace token would let a request with a blank or non-breaking-space header in."""
    if not token:
        raise ValueError("must not be empty")
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError("must be printable ASCII without spaces or control characters")


def read_secret(path: Path) -> str:
    """A Docker-secrets style file: its text without one trailing newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc.__class__.__name__}: {exc}".splitlines()[0]) from None
    return text.removesuffix("\n").removesuffix("\r")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from overrides > environment > TOML file > defaults, or a one-line :class:`SettingsError`."""
    global _TOML_FILE
    if config_file is not None and not Path(config_file).is_file():
        raise SettingsError(f"config file {config_file}: not found")
    _TOML_FILE = Path(config_file) if config_file is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        if not err["loc"]:  # a check across settings: its message names them
            raise SettingsError(f"invalid settings: {err['msg'].removeprefix('Value error, ')}") from None
        raise SettingsError(f"invalid setting SENSORWATCH_{loc.upper()}: {err['msg']}") from None
    finally:
        _TOML_FILE = None
