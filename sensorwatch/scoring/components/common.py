"""Math shared by several components (compiled, scalar, one reading at a time).

Everything here is float64 and follows the formulas the components' docstrings give; the kernels
call these per reading and per channel.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from sensorwatch.scoring.components.special import TAIL_MIN, ZEQ_MAX, gammaincc, ndtri

LN10 = math.log(10.0)
LOG_2 = math.log(2.0)
#: σ of a Gaussian per mean absolute deviation (a robust unit from a running mean of |residual|).
SIGMA_PER_MAD = math.sqrt(math.pi / 2.0)
#: Residuals beyond this many RMS update a running RMS as if they were this large: one huge outlier
#: must not blind the device to the next one.
RECAL_CLIP = 5.0
#: Readings of a channel before its running RMS is used.
RECAL_MIN = 10
#: Surprise (decimal digits) below which the likelihood is exactly 1 − 10^(−surprise).
SURPRISE_EXACT = 8.0
#: Bound of the compressed surprise: likelihood < 1 − 10^(−SURPRISE_TOP) for every finite surprise.
SURPRISE_TOP = 12.0

#: Compiled per-reading functions of the components: inlined into the kernel that calls them (numba
#: IR inlining, measured ~20 % faster per reading than calls, at ~10 s more first compilation).
jit = njit(cache=True, nogil=True, error_model="numpy", inline="always")
#: The kernel's own entry points (called from Python, never inlined).
entry = njit(cache=True, nogil=True, error_model="numpy")


@jit
def floored_std(std: float, level: float, floor_abs: float, floor_rel: float) -> float:
    """``std`` floored absolutely and relative to ``|level|``, so flat series keep a finite scale."""
    return max(max(std, floor_abs), floor_rel * abs(level))


@jit
def rms_update(n: float, ms: float, e: float, ready: bool, window: float) -> tuple[float, float]:
    """One step of a running mean square of residuals over ``window`` readings (exact mean for the
    first ones); once ``ready``, a residual beyond ``RECAL_CLIP`` RMS counts as that large."""
    e2 = min(e * e, RECAL_CLIP**2 * (ms if ready else e * e))
    n_new = n + 1.0
    alpha = 1.0 / min(max(n_new, 1.0), window)
    return n_new, ms + alpha * (e2 - ms)


@jit
def raw_score(z: np.ndarray, scored: np.ndarray, c: float, attribution: np.ndarray) -> float:
    """Raw score in [0, 1) of channel residuals ``z`` (C,) where ``scored``; fills ``attribution`` (C,).

    The channels are combined into one equivalent |z| through the χ²_k tail of Σz² (k = scored
    channels; for k = 1 that is |z| itself, capped where the tail underflows), squashed as
    ``1 − exp(−(z/c)²/2)``. Attribution = each channel's share of Σz² (uniform when Σz² = 0).
    """
    ss = 0.0
    k = 0
    last = 0.0
    for j in range(z.size):
        if scored[j]:
            ss += z[j] * z[j]
            k += 1
            last = z[j]
    if k == 0:
        z_eq = 0.0
    elif k == 1:
        z_eq = min(abs(last), ZEQ_MAX)
    else:
        q = gammaincc(k / 2.0, ss / 2.0)
        z_eq = -ndtri(max(q / 2.0, TAIL_MIN))
    total = 0.0
    for j in range(z.size):
        w = (z[j] * z[j] if scored[j] else 0.0) if ss > 0 else (1.0 if scored[j] else 0.0)
        attribution[j] = w
        total += w
    if total == 0.0:
        for j in range(z.size):
            attribution[j] = 1.0
        total = float(z.size)
    for j in range(z.size):
        attribution[j] /= total
    return -math.expm1(-0.5 * (z_eq / c) ** 2)


@jit
def surprise_to_likelihood(surprise: float) -> float:
    """Map surprise S = −log10(tail) ∈ [0, ∞] monotonically into [0, 1] without ties.

    Up to ``SURPRISE_EXACT`` (8) digits the likelihood is exactly 1 − 10^(−S) (0.9999 ⇔ S = 4);
    above, S is compressed smoothly towards ``SURPRISE_TOP`` (12) digits, so distinct finite
    surprises keep distinct likelihoods below 1.0 in float64. S = ∞ (a range-check hit) is 1.0.

    >>> [round(surprise_to_likelihood(s), 6) for s in (0.0, 4.0)], surprise_to_likelihood(math.inf)
    ([0.0, 0.9999], 1.0)
    >>> surprise_to_likelihood(40.0) < surprise_to_likelihood(50.0) < 1.0
    True
    """
    s = max(surprise, 0.0)
    if math.isinf(s):
        g = math.inf
    elif s <= SURPRISE_EXACT:
        g = s
    else:
        span = SURPRISE_TOP - SURPRISE_EXACT
        over = s - SURPRISE_EXACT
        g = SURPRISE_EXACT + span * over / (over + span)
    return -math.expm1(-g * LN10)


# ----------------------------------------------------------------------------------------------- memory
# Rings of bin means live in the memory stores and are written in place; every write is logged
# (store, row, column, old value) so that a batch that fails is rolled back (see kernel.undo).
MEM32 = 0
MEM64 = 1


@jit
def log_write(mem, which, row, col, value, undo, undo_n) -> None:
    """``mem[row, col] = value`` after logging (store, row, column, old value) as row ``undo_n[0]``
    of ``undo`` (K, 4); ``which`` is MEM32 or MEM64."""
    k = undo_n[0]
    undo[k, 0], undo[k, 1], undo[k, 2], undo[k, 3] = which, row, col, mem[row, col]
    undo_n[0] = k + 1
    mem[row, col] = value


@jit
def ring_slot(bin_index: float, slots: int) -> int:
    """Slot of a bin in a ring of ``slots`` (Python-style remainder: non-negative)."""
    return int(bin_index - slots * math.floor(bin_index / slots))


@jit
def ring_lookup(mem32, mem64, m, o_mean, o_count, o_bin, slots, b, ref, present) -> None:
    """The mean of bin ``b`` (C,) into ``ref`` and whether it holds readings of each channel into
    ``present`` — False once its slot was reused for a later bin."""
    c = ref.size
    s = ring_slot(b, slots)
    hit = mem64[m, o_bin + s] == b
    for j in range(c):
        ref[j] = np.float64(mem32[m, o_mean + s * c + j])
        present[j] = hit and mem32[m, o_count + s * c + j] > 0


@jit
def ring_update(mem32, mem64, m, o_mean, o_count, o_bin, slots, k, x, use, undo, undo_n) -> None:
    """Fold ``x`` (C,) where ``use`` into the mean of bin ``k`` of row ``m``; a slot last written for
    another bin is restarted (for every channel)."""
    c = x.size
    s = ring_slot(k, slots)
    stale = mem64[m, o_bin + s] != k
    for j in range(c):
        cm, cc = o_mean + s * c + j, o_count + s * c + j
        cnt_old = 0.0 if stale else np.float64(mem32[m, cc])
        mean_old = 0.0 if stale else np.float64(mem32[m, cm])
        cnt = cnt_old + (1.0 if use[j] else 0.0)
        mean = mean_old + (x[j] - mean_old) / max(cnt, 1.0) if use[j] else mean_old
        log_write(mem32, MEM32, m, cm, mean, undo, undo_n)
        log_write(mem32, MEM32, m, cc, cnt, undo, undo_n)
    log_write(mem64, MEM64, m, o_bin + s, k, undo, undo_n)
