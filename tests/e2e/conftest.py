"""Fixtures of the end-to-end tests (a real Mosquitto: the shared one on 127.0.0.1:1883, or private)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import SHARED_BROKER, Broker, Names, new_names, port_open
from tests.support import clear_sensorwatch_env


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_sensorwatch_env(monkeypatch)


@pytest.fixture
def names() -> Names:
    return new_names()


@pytest.fixture
def shared_broker() -> str:
    """The Mosquitto every test run has on 127.0.0.1:1883 (``make test`` starts it)."""
    if not port_open(*SHARED_BROKER):
        pytest.fail("no MQTT broker on 127.0.0.1:1883 (run `make broker`)")
    return "mqtt://{}:{}".format(*SHARED_BROKER)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Mosquitto on a free port, stopped (killed if need be) at the end."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
