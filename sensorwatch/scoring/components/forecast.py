"""Forecast residuals: the reading against the prediction stored at the device's previous reading,
on the device's own scale (online recalibration).

``e_rel = (x − predicted mean) / predicted scale`` is the residual relative to the model's
uncertainty (raw units). Once a channel has ``RECAL_MIN`` learnt residuals, ``z = e_rel / RMS(past
e_rel)`` over ``recalibrate_window`` readings: the device's own residual history sets the unit, the
model's scale only says how much more or less certain this step is than usual. Before that (and with
``recalibrate_window=None`` always) ``z = e_rel / normaliser std``. The normaliser's std is not part
of the recalibrated unit: it tracks the spread of the values, which drifts (a level shift inflates
it for thousands of readings) and would make every later residual look small (NAB −9.5 measured).
Only readings past warm-up teach the RMS; a huge outlier counts as ``RECAL_CLIP`` RMS.
"""

from __future__ import annotations

import math

from sensorwatch.scoring.components.common import RECAL_MIN, jit, rms_update
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "forecast"
STATE = (
    Field("pred_mean", CHANNELS),
    # The model's predicted scale in normalised units; times the normaliser's std (unchanged since
    # the prediction) it is the predicted scale in raw units.
    Field("pred_scale", CHANNELS, 1.0),
    Field("rms_count", CHANNELS),
    Field("mean_square", CHANNELS),
)
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return True


@jit
def residuals(row, o, x, observed, has_pred, learn, norm_scale, recalibrate, window, z, scored, e) -> None:
    """Fill ``z`` (C,), ``scored`` (C,: observed and predicted) and ``e`` (C,: the residual in units
    of the model's predicted scale, not recalibrated — ``e_rel / normaliser std`` — 0 where not
    scored); learn the RMS where ``learn``."""
    for j in range(x.size):
        scored[j] = observed[j] and has_pred
        if not scored[j]:
            z[j] = 0.0
            e[j] = 0.0
            continue
        e[j] = x[j] - row[o.pred_mean + j]
        e_rel = e[j] / row[o.pred_scale + j]
        if not recalibrate:
            z[j] = e_rel / norm_scale[j]
            continue
        n, ms = row[o.rms_count + j], row[o.mean_square + j]
        ready = n >= RECAL_MIN
        z[j] = e_rel / max(math.sqrt(ms), 1e-300) if ready else e_rel / norm_scale[j]
        if learn:
            row[o.rms_count + j], row[o.mean_square + j] = rms_update(n, ms, e_rel, ready, window)


@jit
def store_prediction(row, o, mean_n, scale_n, centre, scale) -> None:
    """The model's forecast (normalised units, float32) back in raw units for the next reading."""
    for j in range(centre.size):
        row[o.pred_mean + j] = float(mean_n[j]) * scale[j] + centre[j]
        row[o.pred_scale + j] = float(scale_n[j])
