"""Numenta-style anomaly likelihood of raw scores, and the EWMA-smoothed score.

The short-term mean of the last ``likelihood_short`` raw scores is compared with the long-term
distribution of those means (EW mean and variance over ``likelihood_long`` readings, estimated
*before* this reading): log tail = log(1 − Φ((short − μ)/σ)), kept in log space (``log_ndtr``) so
nothing saturates. :func:`short_term_tail` serves every component that keeps such statistics (the
forecast here, the seasonal check for its own residuals); each declares its own fields.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.components.special import log_ndtr
from sensorwatch.scoring.state import SCALAR, Field, offsets_type

NAME = "likelihood"
LOG_HALF = -math.log(2.0)


def short_ring(c: int, s: object) -> tuple[int, ...]:
    return (s.cfg.likelihood_short,)  # type: ignore[attr-defined]


STATE = (
    Field("count", SCALAR),  # scored readings so far
    Field("smoothed", SCALAR),
    Field("short_ring", short_ring),
    Field("long_mean", SCALAR),
    Field("long_var", SCALAR),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return True


@jit
def short_term_tail(row, o_ring, o_mean, o_var, raw, n, P):
    """(log tail, new long-term mean, new long-term variance) of raw score ``raw`` given ``n``
    earlier scores; :func:`commit` stores them with ``raw`` in the short-term ring."""
    s = P.likelihood_short
    pos = int(n % s)
    total = raw
    for k in range(s):
        if k != pos:
            total += row[o_ring + k]
    short = total / min(n + 1.0, s)
    mean, var = row[o_mean], row[o_var]
    sd = max(math.sqrt(var), P.likelihood_std_floor)
    log_tail = log_ndtr(-(short - mean) / sd) if n >= 2 else LOG_HALF
    alpha = 1.0 / min(n + 1.0, P.likelihood_long)
    delta = short - mean
    return log_tail, mean + alpha * delta, (1.0 - alpha) * (var + alpha * delta * delta)


@jit
def commit(row, o_ring, o_mean, o_var, raw, n, mean, var, s) -> None:
    row[o_ring + int(n % s)] = raw
    row[o_mean], row[o_var] = mean, var
