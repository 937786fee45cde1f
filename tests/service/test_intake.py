"""The service's own health: a dead scoring thread turns /readyz to 503 (intake would hang otherwise)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import load_settings
from tests.support import ADMIN_TOKEN, wait_until


def test_a_dead_scoring_thread_makes_the_service_unready(tmp_path: Path) -> None:
    settings = load_settings(model="builtin", mqtt_url="", state_dir=tmp_path, admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        svc = client.app.state.service  # type: ignore[attr-defined]
        svc.batcher.close()  # the worker thread ends while the doors are still open
        wait_until(lambda: client.get("/readyz").status_code == 503, 10, "/readyz 503")
        assert client.get("/readyz").json()["failure"] == "a scoring thread died"
