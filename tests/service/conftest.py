"""Fixtures of the service tests (REST only: no broker)."""

from __future__ import annotations

import pytest

from tests.support import clear_sensorwatch_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_sensorwatch_env(monkeypatch)
