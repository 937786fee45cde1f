"""Dynamic threshold (Telemanom-style; decides with ``calibrator="threshold"``).

The smoothed scores of the last ``threshold_window`` readings live in a per-device ring (memory,
in place); every ``threshold_every`` readings ε = μ + zσ is re-fit by choosing the z that best
separates the flagged points (largest relative drop of mean and std below ε, penalised by the
number of flagged points and sequences), then minor peaks are pruned by requiring
ε ≥ max nominal score / (1 − p). O(W·Z) every K readings = O(1) amortised per reading.
"""

from __future__ import annotations

import math

import numpy as np

from sensorwatch.scoring.components.common import MEM32, jit, log_write
from sensorwatch.scoring.state import SCALAR, Field, offsets_type

NAME = "threshold"


def _window(c: int, s: object) -> tuple[int, ...]:
    return (s.cfg.threshold_window,)  # type: ignore[attr-defined]


STATE = (Field("epsilon", SCALAR, math.inf), Field("window", _window, store="memory32"))
Offsets = offsets_type(STATE)


def enabled(setup: object) -> bool:
    return setup.cfg.calibrator == "threshold"  # type: ignore[attr-defined]


def z_grid(cfg: object) -> np.ndarray:
    """The z values tried, z_min … z_max by z_step."""
    return np.arange(cfg.z_min, cfg.z_max + 1e-9, cfg.z_step, dtype=np.float64)  # type: ignore[attr-defined]


@jit
def update(row, o, mem32, m, smoothed, count, P, zs, e, undo, undo_n) -> None:
    """Append ``smoothed`` (``count`` scored readings including it) and re-fit ε when due.
    ``e`` is scratch (W,)."""
    w = P.threshold_window
    log_write(mem32, MEM32, m, o.window + int((count - 1) % w), smoothed, undo, undo_n)
    if count % P.threshold_every == 0 and count >= min(w, 2 * P.threshold_every):
        row[o.epsilon] = fit(mem32[m, o.window : o.window + w], count, P, zs, e)


@jit
def fit(ring, count, P, zs, e):
    """ε for one ring of ``count`` written scores (full once ``count ≥ W``)."""
    w = ring.size
    filled = int(min(count, w))
    start = int(count % w) if count >= w else 0
    mu = 0.0
    for k in range(filled):
        e[k] = np.float64(ring[(start + k) % w])
        mu += e[k]
    mu /= filled
    sq = 0.0
    for k in range(filled):
        sq += (e[k] - mu) ** 2
    sigma = math.sqrt(sq / filled)
    best_z, best = zs[zs.size - 1], -math.inf
    for zi in range(zs.size - 1, -1, -1):  # ties go to the larger z (the more conservative)
        eps = mu + zs[zi] * sigma
        n_above = n_seq = 0
        s_below = 0.0
        prev = False
        for k in range(filled):
            above = e[k] > eps
            if above:
                n_above += 1
                if not prev:
                    n_seq += 1
            else:
                s_below += e[k]
            prev = above
        if not (n_above > 0 and n_seq <= P.max_sequences and n_above < 0.5 * filled):
            continue
        n_below = max(filled - n_above, 1)
        mean_below = s_below / n_below
        sq = 0.0
        for k in range(filled):
            if e[k] <= eps:
                sq += (e[k] - mean_below) ** 2
        std_below = math.sqrt(sq / n_below)
        score = ((mu - mean_below) / (mu + 1e-12) + (sigma - std_below) / (sigma + 1e-12)) / max(
            n_seq * n_seq + n_above, 1
        )
        if score > best:
            best, best_z = score, zs[zi]
    eps = mu + best_z * sigma
    nominal = -math.inf
    for k in range(filled):
        if e[k] <= eps:
            nominal = max(nominal, e[k])
    return max(max(eps, nominal / (1.0 - P.prune_p)), P.min_threshold)
