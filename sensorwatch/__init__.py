"""sensorwatch — real-time sensor anomaly detection with per-device streaming recurrent state.

The library is pure computation and files: it never opens a socket and never imports ``service``.
The names below are imported on first use (PEP 562), so a process that only parses readings (the
service's MQTT intake process) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CELLS": "sensorwatch.model.forecaster",
    "Forecaster": "sensorwatch.model.forecaster",
    "ForecasterConfig": "sensorwatch.model.forecaster",
    "Reading": "sensorwatch.scoring.batch",
    "ReadingBatch": "sensorwatch.scoring.batch",
    "RejectReason": "sensorwatch.scoring.batch",
    "StepResult": "sensorwatch.scoring.batch",
    "CALIBRATORS": "sensorwatch.scoring.config",
    "ScorerConfig": "sensorwatch.scoring.config",
    "StreamScorer": "sensorwatch.scoring.scorer",
    "DeviceStateStore": "sensorwatch.state.store",
    "StateIncompatibleError": "sensorwatch.state.store",
}

__all__ = [
    "CALIBRATORS",
    "CELLS",
    "DeviceStateStore",
    "Forecaster",
    "ForecasterConfig",
    "Reading",
    "ReadingBatch",
    "RejectReason",
    "ScorerConfig",
    "StateIncompatibleError",
    "StepResult",
    "StreamScorer",
]

if TYPE_CHECKING:
    from sensorwatch.model.forecaster import CELLS, Forecaster, ForecasterConfig
    from sensorwatch.scoring.batch import Reading, ReadingBatch, RejectReason, StepResult
    from sensorwatch.scoring.config import CALIBRATORS, ScorerConfig
    from sensorwatch.scoring.scorer import StreamScorer
    from sensorwatch.state.store import DeviceStateStore, StateIncompatibleError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sensorwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
