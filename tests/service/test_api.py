"""REST API through FastAPI's TestClient (lifespan included), without a broker (``mqtt_url=""``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sensorwatch.artifacts import load_model
from service.app import create_app
from service.settings import load_settings
from tests.support import (
    ADMIN_TOKEN,
    AUTH,
    build_artifacts,
    corrupt_artifact,
    metric,
    parse_metrics,
    wait_until,
)

T0 = 1_767_225_600.0

#: Every metric the issue lists (sample names as exposed).
ISSUE_METRICS = (
    "sensorwatch_readings_total",
    "sensorwatch_rejections_total",
    "sensorwatch_anomalies_total",
    "sensorwatch_score_latency_seconds_bucket",
    "sensorwatch_batch_size_bucket",
    "sensorwatch_queue_depth",
    "sensorwatch_active_devices",
    "sensorwatch_device_evictions_total",
    "sensorwatch_model_info",
    "sensorwatch_model_reloads_total",
    "sensorwatch_likelihood_bucket",
)
#: Exported only when MQTT is configured (tests/e2e checks them with a broker).
MQTT_METRICS = ("sensorwatch_mqtt_connected", "sensorwatch_mqtt_reconnects_total")


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    build_artifacts(d)
    return d


def make_client(tmp_path: Path, models_dir: Path, **overrides: Any) -> TestClient:
    params: dict[str, Any] = {
        "mqtt_url": "",
        "admin_token": ADMIN_TOKEN,
        "state_dir": tmp_path / "state",
        "models_dir": models_dir,
        "model": "uni/1",
        "max_wait_ms": 1.0,
        **overrides,
    }
    return TestClient(create_app(load_settings(**params)))


@pytest.fixture
def client(tmp_path: Path, models_dir: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, models_dir) as c:
        yield c


def readings(n: int, start: int = 0, value: float = 20.0) -> list[dict[str, Any]]:
    return [{"ts": T0 + i, "values": [value + 0.1 * (i % 5)]} for i in range(start, start + n)]


def score(client: TestClient, body: dict[str, Any], **params: Any) -> list[dict[str, Any]]:
    r = client.post("/v1/score", json=body, params=params)
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["results"]
    return results


def count(client: TestClient, device: str) -> int | None:
    r = client.get(f"/v1/devices/{device}")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    n: int = r.json()["count"]
    return n


# ---------------------------------------------------------------------------------------------- scoring
def test_score_single_device(client: TestClient) -> None:
    body = {"device_id": "pump-7", "readings": readings(5)}
    results = score(client, body)
    assert [r["ts"] for r in results] == [T0 + i for i in range(5)]
    assert all(r["accepted"] and r["device_id"] == "pump-7" for r in results)
    assert all(r["model_version"] == "uni/1" and r["warming_up"] for r in results)
    assert {"likelihood", "is_anomaly", "predicted", "attribution", "threshold"} <= results[0].keys()
    assert count(client, "pump-7") == 5


def test_score_batch_form_keeps_request_order(client: TestClient) -> None:
    body = {
        "batch": [
            {"device_id": "a", "readings": readings(3)},
            {"device_id": "b", "readings": [{"ts": "2026-01-01T00:00:00Z", "values": {"ch0": 1.0}}]},
            {"device_id": "c", "readings": readings(2, start=10)},
        ]
    }
    results = score(client, body)
    assert [(r["device_id"], r["ts"]) for r in results] == [
        ("a", T0),
        ("a", T0 + 1),
        ("a", T0 + 2),
        ("b", T0),  # RFC 3339 → unix seconds
        ("c", T0 + 10),
        ("c", T0 + 11),
    ]
    assert all(r["accepted"] for r in results)
    assert (count(client, "a"), count(client, "b"), count(client, "c")) == (3, 1, 2)


def test_rejections_have_reason_and_detail_and_do_not_touch_state(client: TestClient) -> None:
    score(client, {"device_id": "d1", "readings": readings(3, start=100)})
    body = {
        "device_id": "d1",
        "readings": [
            {"ts": T0 + 50, "values": [20.0]},  # before the last scored reading
            {"ts": T0 + 103, "values": ["x"]},
            {"ts": T0 + 104, "values": [1.0, 2.0]},
            {"ts": T0 + 105, "values": [20.0]},  # the good one
            {"ts": T0 + 106, "values": {"nope": 1.0}},
            {"ts": T0 + 102, "values": [20.0]},  # repeats a scored timestamp
            {"ts": "yesterday", "values": [20.0]},
            {"ts": T0 + 107, "values": [None]},
        ],
    }
    results = score(client, body)
    reasons = [r.get("reason") for r in results]
    assert reasons == [
        "out_of_order",
        "bad_value",
        "wrong_channel_count",
        None,
        "unknown_channel",
        "duplicate_timestamp",
        "bad_timestamp",
        "no_values",
    ]
    for r in results:
        assert r["device_id"] == "d1"
        if not r["accepted"]:
            assert set(r) == {"device_id", "ts", "accepted", "reason", "detail"}
            assert r["detail"]
            assert r["detail"] != r["reason"]
    assert results[0]["ts"] == T0 + 50
    assert count(client, "d1") == 4  # 3 + the one good reading
    m = client.get("/metrics").text
    for reason in ("out_of_order", "bad_value", "wrong_channel_count", "duplicate_timestamp"):
        assert metric(m, "sensorwatch_rejections_total", reason=reason) == 1
    assert metric(m, "sensorwatch_readings_total", source="rest", outcome="scored") == 4
    assert metric(m, "sensorwatch_readings_total", source="rest", outcome="rejected") == 7


def test_non_finite_and_nan_tokens(client: TestClient) -> None:
    # Python's json (and so FastAPI) reads the non-standard Infinity / NaN tokens.
    values = ["Infinity", "-Infinity", "NaN", "1.5"]
    items = ", ".join(f'{{"ts": {T0 + i}, "values": [{v}]}}' for i, v in enumerate(values))
    raw = f'{{"device_id": "d2", "readings": [{items}]}}'
    r = client.post("/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    # A univariate reading whose only value is NaN has every channel missing.
    assert [x.get("reason") for x in results] == ["non_finite", "non_finite", "no_values", None]
    assert count(client, "d2") == 1
    json.loads(r.text, parse_constant=_no_constants)  # the response itself is strict JSON


def _no_constants(token: str) -> None:
    raise AssertionError(f"response contains the non-JSON token {token}")


def test_invalid_requests_are_422(client: TestClient) -> None:
    bad_bodies: list[Any] = [
        {},
        {"device_id": "a"},
        {"device_id": "a", "readings": []},
        {"device_id": "a", "readings": readings(1), "batch": []},
        {"device_id": "bad/id", "readings": readings(1)},
        {"batch": [{"device_id": "", "readings": readings(1)}]},
        {"device_id": "a", "readings": [{"ts": T0, "values": [1.0], "extra": 1}]},
        [1, 2],
    ]
    for body in bad_bodies:
        assert client.post("/v1/score", json=body).status_code == 422, body
    r = client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400  # not JSON at all: a 400 with the reason MQTT dead-letters it with
    assert r.json()["reason"] == "malformed_json"
    # Every refused request is counted once (its readings could not be parsed), as for MQTT messages;
    # the body that is not JSON as malformed_json.
    text = client.get("/metrics").text
    assert metric(text, "sensorwatch_rejections_total", reason="bad_payload") == len(bad_bodies)
    assert metric(text, "sensorwatch_rejections_total", reason="malformed_json") == 1
    assert (
        metric(text, "sensorwatch_readings_total", source="rest", outcome="rejected") == len(bad_bodies) + 1
    )


def test_dry_run_does_not_advance_state(client: TestClient) -> None:
    score(client, {"device_id": "d3", "readings": readings(10)})
    ahead = {"device_id": "d3", "readings": readings(5, start=10, value=25.0)}
    preview = client.post("/v1/score", json=ahead, params={"dry_run": "true"})
    assert preview.status_code == 200
    assert preview.json()["dry_run"] is True
    assert count(client, "d3") == 10
    assert client.get("/v1/devices/d3").json()["last_ts"] == T0 + 9
    # Dry-running an unknown device does not create it.
    client.post("/v1/score", json={"device_id": "ghost", "readings": readings(2)}, params={"dry_run": True})
    assert count(client, "ghost") is None
    # The preview is exactly what the real scoring then gives.
    real = score(client, ahead)
    assert preview.json()["results"] == real
    assert count(client, "d3") == 15


def test_a_far_future_timestamp_is_refused_and_does_not_poison_its_device(client: TestClient) -> None:
    """``ts`` 1e12, year 9999 or an hour ahead of the wall clock: ts_out_of_range with a detail, in a
    dry run too; the device then scores its real readings (before the check, every later reading was
    out_of_order)."""
    import time

    now = time.time()
    for ts in (1e12, "9999-01-01T00:00:00Z", now + 3600):
        for params in ({}, {"dry_run": "true"}):
            [res] = score(client, {"device_id": "fut", "readings": [{"ts": ts, "values": [1.0]}]}, **params)
            assert res["accepted"] is False, (ts, params)
            assert res["reason"] == "ts_out_of_range"
            assert "max_future_s" in res["detail"]
    ok = score(client, {"device_id": "fut", "readings": [{"ts": now + i, "values": [1.0]} for i in range(3)]})
    assert [r["accepted"] for r in ok] == [True, True, True]
    preview = score(
        client, {"device_id": "fut", "readings": [{"ts": now + 60, "values": [1.0]}]}, dry_run="true"
    )
    assert preview[0]["accepted"] is True  # a dry run compares with the clock of now, not of the last batch
    m = client.get("/metrics").text
    assert metric(m, "sensorwatch_rejections_total", reason="ts_out_of_range") == 3


# ---------------------------------------------------------------------------------------------- devices
def test_devices_get_and_delete(client: TestClient) -> None:
    assert client.get("/v1/devices/pump-1").status_code == 404
    score(client, {"device_id": "pump-1", "readings": readings(4)})
    info = client.get("/v1/devices/pump-1").json()
    assert info["device_id"] == "pump-1"
    assert info["count"] == 4
    assert info["last_ts"] == T0 + 3
    assert info["warming_up"] is True
    assert info["model_version"] == "uni/1"
    assert "last_likelihood" in info

    assert client.delete("/v1/devices/pump-1").status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert client.delete("/v1/devices/pump-1", headers=wrong).status_code == 401
    assert count(client, "pump-1") == 4
    r = client.delete("/v1/devices/pump-1", headers=AUTH)
    assert r.status_code == 204
    assert r.content == b""
    assert client.get("/v1/devices/pump-1").status_code == 404
    assert metric(client.get("/metrics").text, "sensorwatch_active_devices") == 0
    assert client.delete("/v1/devices/pump-1", headers=AUTH).status_code == 404
    # It starts afresh with warm-up, and earlier timestamps are accepted again.
    results = score(client, {"device_id": "pump-1", "readings": readings(1)})
    assert results[0]["accepted"]
    assert count(client, "pump-1") == 1


# ---------------------------------------------------------------------------------------------- models
def test_models_lists_active_and_available(client: TestClient, models_dir: Path) -> None:
    body = client.get("/v1/models").json()
    active = body["active"]
    assert (active["name"], active["version"], active["cell"], active["channels"]) == (
        "uni",
        "1",
        "lstm",
        ["ch0"],
    )
    assert active["sha256"] == load_model("uni/1", models_dir).sha256
    assert {(m["name"], m["version"]) for m in body["available"]} == {
        ("uni", "1"),
        ("uni", "2"),
        ("gru", "1"),
    }


def test_model_builtin_selects_the_persistence_model(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir, model="builtin") as c:
        active = c.get("/v1/models").json()["active"]
        assert (active["name"], active["version"], active["sha256"]) == ("builtin-persistence", "0", None)
        # It scores like any model (warm-up first, then likelihoods).
        res = score(c, {"device_id": "b", "readings": readings(80)})
        assert [r["warming_up"] for r in res[:3]] == [True, True, True]
        assert res[-1]["likelihood"] is not None


def reload(client: TestClient, model: str, headers: dict[str, str] | None = AUTH) -> Any:
    return client.post("/v1/models/reload", json={"model": model}, headers=headers)


def test_reload_same_architecture_keeps_state(client: TestClient) -> None:
    score(client, {"device_id": "k1", "readings": readings(20)})
    r = reload(client, "uni/2")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "kept"
    assert (body["old"]["version"], body["new"]["version"]) == ("1", "2")
    assert body["old"]["sha256"] != body["new"]["sha256"]
    assert client.get("/v1/models").json()["active"]["version"] == "2"
    assert count(client, "k1") == 20
    results = score(client, {"device_id": "k1", "readings": readings(1, start=20)})
    assert results[0]["model_version"] == "uni/2"
    assert results[0]["predicted"]["ch0"] is not None  # continued from the kept state
    m = client.get("/metrics").text
    assert metric(m, "sensorwatch_model_info", name="uni", version="2") == 1
    assert ("sensorwatch_model_info", frozenset({("name", "uni"), ("version", "1")})) not in parse_metrics(m)
    assert metric(m, "sensorwatch_model_reloads_total", outcome="success") == 1


def test_reload_other_architecture_resets_state(client: TestClient) -> None:
    score(client, {"device_id": "k2", "readings": readings(20)})
    r = reload(client, "gru/1")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "reset"
    assert r.json()["new"]["cell"] == "gru"
    assert count(client, "k2") is None
    assert metric(client.get("/metrics").text, "sensorwatch_active_devices") == 0
    results = score(client, {"device_id": "k2", "readings": readings(1, start=20)})
    assert results[0]["model_version"] == "gru/1"
    assert results[0]["warming_up"] is True
    assert count(client, "k2") == 1


def test_reload_refuses_bad_artifacts_and_keeps_serving(client: TestClient, models_dir: Path) -> None:
    score(client, {"device_id": "k3", "readings": readings(5)})
    corrupt_artifact(models_dir, "uni", "2")
    # A corrupt artifact: 422 (shaped as a validation error of the model field); an unknown name or
    # version: 404; a reference that is no NAME[/VERSION] is refused by the schema (never loaded).
    for ref, code in (("uni/2", 422), ("nope", 404), ("uni/9", 404), ("../uni", 422), ("a/b/c", 422)):
        r = reload(client, ref)
        assert r.status_code == code, (ref, r.text)
        assert "detail" in r.json()
    assert reload(client, "uni/2").json()["detail"][0]["loc"] == ["body", "model"]
    assert client.get("/v1/models").json()["active"]["version"] == "1"
    assert score(client, {"device_id": "k3", "readings": readings(1, start=5)})[0]["model_version"] == "uni/1"
    assert count(client, "k3") == 6
    m = client.get("/metrics").text
    assert metric(m, "sensorwatch_model_reloads_total", outcome="failure") == 4  # 3 refs + the repeat
    assert metric(m, "sensorwatch_model_reloads_total", outcome="success") == 0
    assert metric(m, "sensorwatch_model_info", name="uni", version="1") == 1


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ""},
        {"Authorization": "Bearer \xa0".encode("latin-1")},  # a non-breaking space (once stripped)
        {"Authorization": f"Bearer {ADMIN_TOKEN} "},
        {"Authorization": f"Bearer  {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}\xa0".encode("latin-1")},
        {"Authorization": f"bearer {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Authorization": ADMIN_TOKEN},
    ],
)
def test_reload_needs_the_admin_token(client: TestClient, headers: dict[str, Any] | None) -> None:
    r = reload(client, "uni/2", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models").json()["active"]["version"] == "1"


def test_reload_refuses_files_linked_out_of_the_models_directory(
    client: TestClient, models_dir: Path, tmp_path: Path
) -> None:
    """A card or weights file symlinked outside the models directory, or a symlink loop, is a 422
    with a reason, never loaded and never a 500."""
    import os
    import shutil

    outside = tmp_path / "outside"
    outside.mkdir()
    version = models_dir / "uni" / "2"
    weights = version / "model.safetensors"
    shutil.move(weights, outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", weights)  # a valid file, but outside
    r = reload(client, "uni/2")
    assert r.status_code == 422, r.text
    assert "outside the models directory" in r.json()["detail"][0]["msg"]
    card = version / "card.json"
    shutil.move(card, outside / "card.json")
    os.symlink(outside / "card.json", card)
    assert reload(client, "uni/2").status_code == 422
    loop = models_dir / "uni" / "7"
    os.symlink(loop, loop)
    r = reload(client, "uni/7")
    assert r.status_code == 404, r.text  # a version directory that is a symlink loop holds no model
    assert "no model 'uni/7'" in r.json()["detail"]
    assert client.get("/v1/models").json()["active"]["version"] == "1"


def test_insecure_no_auth_opens_admin_endpoints(tmp_path: Path, models_dir: Path) -> None:
    params: dict[str, Any] = {
        "mqtt_url": "",
        "state_dir": tmp_path / "s",
        "models_dir": models_dir,
        "model": "uni/1",
    }
    with TestClient(create_app(load_settings(**params), insecure_no_auth=True)) as c:
        assert reload(c, "uni/2", headers=None).status_code == 200


# ---------------------------------------------------------------------------------------------- limits
def test_request_body_limit(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir, max_request_bytes=2048) as c:
        big = {"device_id": "a", "readings": readings(60)}
        assert len(json.dumps(big)) > 2048
        r = c.post("/v1/score", json=big)
        assert r.status_code == 413
        assert "2048" in r.json()["detail"]
        # Without a Content-Length (chunked upload), the limit holds while streaming.
        data = json.dumps(big).encode()
        chunks = (data[i : i + 512] for i in range(0, len(data), 512))
        r = c.post("/v1/score", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert count(c, "a") is None
        assert c.post("/v1/score", json={"device_id": "a", "readings": readings(5)}).status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "sensorwatch_rejections_total", reason="payload_too_large") == 2
        assert metric(text, "sensorwatch_readings_total", source="rest", outcome="rejected") == 2


def test_request_readings_limit(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir, max_request_readings=5) as c:
        r = c.post("/v1/score", json={"device_id": "a", "readings": readings(6)})
        assert r.status_code == 413
        batch = {"batch": [{"device_id": d, "readings": readings(3)} for d in ("a", "b")]}
        assert c.post("/v1/score", json=batch).status_code == 413
        assert count(c, "a") is None
        assert len(score(c, {"device_id": "a", "readings": readings(5)})) == 5
        text = c.get("/metrics").text
        assert metric(text, "sensorwatch_rejections_total", reason="too_many_readings") == 6 + 6
        assert metric(text, "sensorwatch_readings_total", source="rest", outcome="rejected") == 12


# ---------------------------------------------------------------------------------------------- ops
def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["ready"] is True
    assert r.json()["mqtt_connected"] is None  # REST only
    assert r.json()["model"] == "uni/1"


def test_metrics_names_and_no_device_label(client: TestClient) -> None:
    score(client, {"batch": [{"device_id": f"dev-{i}", "readings": readings(3)} for i in range(5)]})
    score(client, {"device_id": "dev-0", "readings": [{"ts": T0, "values": [1.0]}]})  # duplicate
    r = client.get("/metrics")
    assert r.status_code == 200
    text = r.text
    samples = parse_metrics(text)
    names = {name for name, _ in samples}
    missing = [n for n in ISSUE_METRICS if n not in names]
    assert not missing, missing
    for name, labels in samples:
        for key, _ in labels:
            assert "device" not in key, (name, key)
    assert "dev-0" not in text
    assert metric(text, "sensorwatch_readings_total", source="rest", outcome="scored") == 15
    assert metric(text, "sensorwatch_active_devices") == 5
    assert metric(text, "sensorwatch_likelihood_count") == 15
    assert metric(text, "sensorwatch_score_latency_seconds_count") == 15  # scored readings only
    assert metric(text, "sensorwatch_batch_size_sum") == 16
    assert metric(text, "sensorwatch_queue_depth") == 0
    # REST only: no MQTT series (a constant 0 would keep the MQTTDisconnected alert firing).
    assert not names & set(MQTT_METRICS)
    assert metric(text, "sensorwatch_model_info", name="uni", version="1") == 1


def test_openapi_has_examples_for_score(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/score"]["post"]
    schemas = spec["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        return schemas[ref.rsplit("/", 1)[1]] if ref else schema

    request = resolve(op["requestBody"]["content"]["application/json"]["schema"])
    examples = request["examples"]
    assert any("device_id" in e for e in examples)
    assert any("batch" in e for e in examples)
    response = resolve(op["responses"]["200"]["content"]["application/json"]["schema"])
    assert response["examples"][0]["results"]
    assert any(p["name"] == "dry_run" for p in op["parameters"])
    assert "examples" in resolve(
        spec["paths"]["/v1/models/reload"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )


# ---------------------------------------------------------------------------------------------- state
def test_state_is_snapshotted_on_stop_and_restored_on_start(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir) as c:
        score(c, {"device_id": "s1", "readings": readings(7)})
    snapshot = tmp_path / "state" / "state.safetensors"
    assert snapshot.is_file()
    with make_client(tmp_path, models_dir) as c:
        info = c.get("/v1/devices/s1").json()
        assert (info["count"], info["last_ts"]) == (7, T0 + 6)
        assert c.get("/readyz").json()["devices"] == 1
        assert metric(c.get("/metrics").text, "sensorwatch_active_devices") == 1
        # The restored state continues: an earlier timestamp is out of order, the next one scores.
        results = score(
            c, {"device_id": "s1", "readings": [readings(1, start=3)[0], readings(1, start=7)[0]]}
        )
        assert [r.get("reason") for r in results] == ["out_of_order", None]
    # Another architecture cannot use that state: it is moved aside and the service starts fresh.
    with make_client(tmp_path, models_dir, model="gru/1") as c:
        assert c.get("/v1/devices/s1").status_code == 404
    assert list((tmp_path / "state").glob("state.incompatible-*"))


def test_periodic_snapshots(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir, snapshot_interval_s=0.1) as c:
        score(c, {"device_id": "p1", "readings": readings(2)})
        snapshot = tmp_path / "state" / "state.safetensors"
        wait_until(
            lambda: metric(c.get("/metrics").text, "sensorwatch_state_snapshots_total") >= 2, 10, "snapshots"
        )
        assert snapshot.is_file()


def test_no_state_dir_means_no_snapshot(tmp_path: Path, models_dir: Path) -> None:
    with make_client(tmp_path, models_dir, state_dir=None) as c:
        score(c, {"device_id": "n1", "readings": readings(2)})
    assert not (tmp_path / "state").exists()


def test_docs_page_loads_nothing_from_the_internet(client: TestClient) -> None:
    """``/docs`` references only this service's own URLs, and each of them is served: the page
    renders on a machine without internet (the default Swagger page loaded its JavaScript and CSS
    from a CDN and was blank offline)."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert refs
    assert not [r for r in refs if "://" in r or r.startswith("//")], refs
    for ref in refs:
        r = client.get(ref)
        assert r.status_code == 200, ref
    assert "swagger-ui-bundle.js" in page.text
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"]
    assert len(js.content) > 500_000  # the real bundle, not a stub
    assert client.get("/openapi.json").json()["info"]["title"] == "sensorwatch"
