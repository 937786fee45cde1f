"""Shared fixtures for the sensorwatch test suite."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sensorwatch import Forecaster, ForecasterConfig, ScorerConfig
from sensorwatch.scoring.config import CalibratorName

ModelFactory = Callable[..., Forecaster]
ConfigFactory = Callable[..., ScorerConfig]


def build_model(cell: str, hidden: int = 16, layers: int = 2, channels: int = 2, seed: int = 0) -> Forecaster:
    """A forecaster with random (non-persistence) weights, reproducible from ``seed``.

    The default head is zero (a persistence forecast): re-initialising every parameter with
    N(0, 0.3²) makes the prediction depend on the recurrent state, so state handling bugs show.
    """
    model = Forecaster(ForecasterConfig(cell=cell, hidden_size=hidden, num_layers=layers, channels=channels))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def build_small_config(calibrator: CalibratorName = "likelihood", **overrides: object) -> ScorerConfig:
    """Short warm-up and windows so that every code path is exercised by short sequences."""
    params: dict[str, object] = {
        "calibrator": calibrator,
        "warmup": 5,
        "threshold_every": 4,
        "threshold_window": 16,
        "range_warmup": 10,
        "likelihood_long": 50,
    }
    params.update(overrides)
    return ScorerConfig(**params)  # type: ignore[arg-type]


@pytest.fixture
def make_model() -> ModelFactory:
    """``make_model(cell, hidden=16, layers=2, channels=2, seed=0)`` → a randomly initialised Forecaster."""
    return build_model


@pytest.fixture
def small_config() -> ConfigFactory:
    """``small_config(calibrator, **overrides)`` → a ScorerConfig with short warm-up and windows."""
    return build_small_config
