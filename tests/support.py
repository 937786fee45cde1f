"""Helpers shared by the service and end-to-end tests: polling, metrics, model artifacts, env."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sensorwatch.artifacts import save_model
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig, builtin_model

T = TypeVar("T")

ADMIN_TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition: (name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(text: str, name: str, /, **labels: str) -> float:
    """One sample's value (0 when the series does not exist)."""
    return parse_metrics(text).get((name, frozenset(labels.items())), 0.0)


def clear_sensorwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not see SENSORWATCH_* variables of the shell that runs them."""
    for key in list(os.environ):
        if key.startswith("SENSORWATCH_"):
            monkeypatch.delenv(key)


def build_artifacts(models_dir: Path) -> None:
    """Model artifacts for reload tests, all univariate:

    * ``uni/1`` — the built-in architecture (LSTM, hidden 32, one layer);
    * ``uni/2`` — the same architecture with a perturbed head (device state can be kept);
    * ``gru/1`` — a different architecture (GRU, hidden 16: device state must be reset).
    """
    base = builtin_model(1)
    save_model(base, models_dir, "uni", "1")
    other = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        other.head.weight.add_(0.01 * torch.randn(other.head.weight.shape, generator=gen))
    save_model(other, models_dir, "uni", "2")
    save_model(Forecaster(ForecasterConfig(cell="gru", hidden_size=16)), models_dir, "gru", "1")


def corrupt_artifact(models_dir: Path, name: str, version: str) -> None:
    """Overwrite bytes in the middle of an artifact's weights (its card's sha256 no longer matches)."""
    weights = models_dir / name / version / "model.safetensors"
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = b"\xff" * 16
    weights.write_bytes(bytes(data))
