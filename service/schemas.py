"""REST request/response models (with the OpenAPI examples users see in /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from service.payloads import DEVICE_ID

DEVICE_FIELD = Field(pattern=DEVICE_ID.pattern, examples=["pump-7"], description="Device id.")


class ReadingIn(BaseModel):
    """One reading. Malformed *values or timestamps* are per-reading rejections, not request errors."""

    model_config = ConfigDict(extra="forbid")
    ts: Any = Field(
        description="Unix seconds or RFC 3339 with offset.", examples=[1767225600, "2026-01-01T00:00:00Z"]
    )
    values: Any = Field(
        description="A list (by position) or an object (by channel name); null = missing.",
        examples=[[21.5], {"ch0": 21.5}],
    )


class DeviceReadings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = DEVICE_FIELD
    readings: list[ReadingIn] = Field(min_length=1)


class BatchRequest(BaseModel):
    """Several devices' readings (a gateway)."""

    model_config = ConfigDict(extra="forbid")
    batch: list[DeviceReadings] = Field(min_length=1)


class ScoreRequest(RootModel[DeviceReadings | BatchRequest]):
    """Either one device (``device_id`` + ``readings``) or several (``batch``). Two forms in the
    schema (not one object with every field optional): a body that mixed them was schema-valid but
    refused (schemathesis, issue #13)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"device_id": "pump-7", "readings": [{"ts": 1767225600, "values": [21.5]}]},
                {
                    "batch": [
                        {
                            "device_id": "pump-7",
                            "readings": [{"ts": "2026-01-01T00:00:00Z", "values": [21.5]}],
                        },
                        {"device_id": "pump-8", "readings": [{"ts": 1767225600, "values": {"ch0": 19.0}}]},
                    ]
                },
            ]
        },
    )

    def groups(self) -> list[DeviceReadings]:
        body = self.root
        return body.batch if isinstance(body, BatchRequest) else [body]


RESULT_EXAMPLE: dict[str, Any] = {
    "device_id": "pump-7",
    "ts": 1767225600.0,
    "accepted": True,
    "predicted": {"ch0": 21.4},
    "z": {"ch0": 0.31},
    "raw_score": 0.012,
    "smoothed_score": 0.02,
    "threshold": 0.9999,
    "likelihood": 0.41,
    "is_anomaly": False,
    "kind": None,
    "severity": None,
    "value": {"ch0": 21.6},
    "attribution": {"ch0": 1.0},
    "warming_up": False,
    "gap_reset": False,
    "imputed": [],
    "model_version": "univariate/2",
    "event_id": "5f0c9a1e2b7d4c3a8e6f1b2d",
}
REJECTION_EXAMPLE: dict[str, Any] = {
    "device_id": "pump-7",
    "ts": 1767225500.0,
    "accepted": False,
    "reason": "out_of_order",
    "detail": "ts is before the device's last reading",
}


class ScoreResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"results": [RESULT_EXAMPLE, REJECTION_EXAMPLE]}]}
    )
    results: list[dict[str, Any]] = Field(
        description="One result or rejection per reading, in request order."
    )
    dry_run: bool = False


class Refusal(BaseModel):
    """A request refused whole: ``reason`` is the code counted in ``sensorwatch_rejections_total``
    (the MQTT dead letters use the same codes) — except ``result_timeout`` (504), whose readings are
    not refused: they are queued and will be scored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"detail": "nested deeper than the parser allows", "reason": "too_deep"}]
        }
    )
    detail: str
    reason: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"model": "univariate/2"}]})
    model: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$",
        description="NAME or NAME/VERSION under the models directory.",
    )


class Detail(BaseModel):
    """An error answer: what went wrong, for a person."""

    detail: str


class DeviceInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_id": "pump-7",
                    "count": 1234,
                    "last_ts": 1767225600.0,
                    "warming_up": False,
                    "readings_since_reset": 1234,
                    "last_likelihood": 0.41,
                    "model_version": "univariate/2",
                }
            ]
        }
    )
    device_id: str
    count: int
    last_ts: float
    warming_up: bool
    readings_since_reset: int
    last_likelihood: float | None
    model_version: str
