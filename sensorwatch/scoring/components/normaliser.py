"""Model inputs: the per-device running normaliser and the Δt feature (the same formulas as
:mod:`sensorwatch.scoring.features`, which training uses; ``test_contract`` checks they agree).

Normaliser: per channel an exponentially weighted mean/variance whose weight is ``1/n`` for the
first ``norm_window`` observations (the exact running mean) and ``1/norm_window`` after; the std is
floored so flat series stay finite. The current reading is included before it is normalised.
Δt feature: ``log(Δt) − mean log(Δt)`` of the device, clipped; 0 for a first reading.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import floored_std, jit
from sensorwatch.scoring.state import CHANNELS, SCALAR, Field, offsets_type

NAME = "normaliser"
STATE = (
    Field("count", CHANNELS),
    Field("mean", CHANNELS),
    Field("var", CHANNELS),
    Field("dt_count", SCALAR),
    Field("dt_log_mean", SCALAR),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return True


@jit
def scale_before(row, o, j, floor_abs, floor_rel):
    """Channel ``j``'s normaliser scale before this reading (raw units per normalised unit)."""
    return floored_std(math.sqrt(row[o.var + j]), row[o.mean + j], floor_abs, floor_rel)


@jit
def normalise(row, o, x_filled, observed, window, floor_abs, floor_rel, x_norm, centre, scale) -> None:
    """Fold the observed channels in; fill ``x_norm`` and the ``centre``/``scale`` that map
    normalised units back to raw ones (``raw = norm·scale + centre``)."""
    for j in range(x_filled.size):
        mean, var = row[o.mean + j], row[o.var + j]
        if observed[j]:
            n = row[o.count + j] + 1.0
            row[o.count + j] = n
            alpha = 1.0 / min(n, window)
            delta = x_filled[j] - mean
            mean = mean + alpha * delta
            var = (1.0 - alpha) * (var + alpha * delta * delta)
            row[o.mean + j], row[o.var + j] = mean, var
        s = floored_std(math.sqrt(var), mean, floor_abs, floor_rel)
        centre[j], scale[j] = mean, s
        x_norm[j] = (x_filled[j] - mean) / s


@jit
def delta_t(row, o, dt, learn, window, clip):
    """The Δt feature of ``dt`` seconds (NaN for a first reading); ``learn`` (not a gap reset)
    lets it update the typical interval."""
    has_dt = math.isfinite(dt) and dt > 0
    log_dt = math.log(dt) if has_dt else 0.0
    log_mean = row[o.dt_log_mean]
    feat = log_dt - log_mean if has_dt and row[o.dt_count] > 0 else 0.0
    feat = min(max(feat, -clip), clip)
    if learn and has_dt:
        n = row[o.dt_count] + 1.0
        row[o.dt_count] = n
        row[o.dt_log_mean] = log_mean + (1.0 / min(max(n, 1.0), window)) * (log_dt - log_mean)
    return feat
