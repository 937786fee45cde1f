"""Point likelihood (``point_likelihood``): the two-sided Gaussian tail of the reading's own
equivalent |z| (inverted from its raw score), so an isolated in-range spike that barely moves the
short-term mean is seen. No state of its own.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import LOG_2, jit
from sensorwatch.scoring.components.special import log_ndtr
from sensorwatch.scoring.state import Field

NAME = "point"
STATE: tuple[Field, ...] = ()
#: Largest raw score inverted (raw rounds to 1.0 beyond z ≈ 8.6·c).
RAW_MAX = 1.0 - 2.0**-53


def enabled(setup: object) -> bool:
    return bool(setup.cfg.point_likelihood)  # type: ignore[attr-defined]


@jit
def log_tail(raw, c):
    z_eq = c * math.sqrt(-2.0 * math.log1p(-min(raw, RAW_MAX)))
    return LOG_2 + log_ndtr(-z_eq)
