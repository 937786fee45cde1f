"""sensorwatch — real-time sensor anomaly detection with per-device streaming recurrent state.

The library is pure computation and files: it never opens a socket and never imports ``service``.
"""

from sensorwatch.model.forecaster import CELLS, Forecaster, ForecasterConfig
from sensorwatch.scoring.batch import Reading, ReadingBatch, RejectReason, StepResult
from sensorwatch.scoring.config import CALIBRATORS, ScorerConfig
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.state.store import DeviceStateStore, StateIncompatibleError

__version__ = "0.1.0"

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
