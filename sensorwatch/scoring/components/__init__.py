"""The scoring components, in the order a reading passes through them.

Each module declares its per-device state once (``STATE``: a tuple of
:class:`~sensorwatch.scoring.state.Field`), says when it is on (``enabled(setup)``) and holds the
compiled functions the fused kernel (:mod:`sensorwatch.scoring.kernel`) calls for each reading; it
reads and writes only its own fields. Adding a check = one module here, one ``ScorerConfig`` field,
one entry in :data:`COMPONENTS` and one call in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from sensorwatch.model.forecaster import ForecasterConfig
from sensorwatch.scoring.components import (
    alert_filter,
    core,
    forecast,
    likelihood,
    model_season,
    normaliser,
    range_check,
    seasonal_check,
    stuck_check,
    threshold,
)
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.state import Layout

#: Stateful components in kernel order (the point likelihood and the decision keep no state).
COMPONENTS: tuple[ModuleType, ...] = (
    core,
    forecast,
    seasonal_check,
    likelihood,
    range_check,
    stuck_check,
    alert_filter,
    threshold,
    normaliser,
    model_season,
)


@dataclass(frozen=True)
class Setup:
    """What decides which components are on and their field shapes."""

    cfg: ScorerConfig
    model: ForecasterConfig


#: The record of every component's offsets the kernels read (``O.core.count``).
OFFSETS = np.dtype([(m.NAME, m.Offsets) for m in COMPONENTS])


def layout(setup: Setup) -> Layout:
    on = [(m.NAME, m.STATE) for m in COMPONENTS if m.enabled(setup)]
    return Layout(on, setup.model.channels, setup)


def offsets(lay: Layout) -> np.ndarray:
    """A one-element :data:`OFFSETS` array: every component's offsets, ``-1`` for those that are off."""
    rec = np.full(1, -1, dtype=OFFSETS)  # (fills every int64 field)
    for comp, fields in lay.offsets.items():
        for name, off in fields.items():
            rec[0][comp][name] = off
    return rec
