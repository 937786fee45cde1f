"""Stuck-sensor check (``stuck_check``): how unlikely is the current run of identical values, given
the runs this channel has had so far?

The tail is the channel's own run-length survival, learnt without a parametric shape: per channel,
``chances`` counts the comparisons made right after a change (where a run may start) and
``survived[k]`` the runs that reached 2^k repeats (k = 0 … OCTAVES − 1). A run of r repeats has

    log P(run ≥ r) = log((S₀ + 1) / (N + 2)) + Σ_k log((S_k + 1) / (S_{k−1} + 2))

over the octaves it has passed (the last one in proportion to log₂ r), without the current run's
own counts; past the channel's longest run each further octave takes the factor of the last octave
with data again (the tail keeps falling as it fell). A channel that has had no run of two repeats
or more yet falls back to independent repeats: factor p^(2^(k−1)) per octave, p the
(Laplace-smoothed) share of all comparisons that were repeats. So a noisy sensor that freezes
(p ≈ 1/n) is caught at its second repeat, a channel that has never changed (p ≈ 1) is not stuck,
and a channel with a history of runs follows its own run lengths: one that routinely sits flat for
a while (server counters, quantised or idle signals) needs a run longer than its usual ones by as
many octaves as its history makes unlikely. Both simpler models failed on such channels:
independent repeats (tail p^r, p the repeat rate) and a two-state Markov chain (a geometric run
length) took their ordinary flat stretches of 15–30 readings for a freeze: 548 and 223 of ASD's
false alarm episodes with the persistence forecaster.

A run the check flags is left out of the counts while it lasts and counts ``FLAGGED_WEIGHT`` (half)
once it ends: a freeze does not make the next one look normal, yet a flat stretch that recurs is
learnt. Counts halve when ``chances`` reaches the window (an exponential memory of ~window
opportunities). Channels are tested together: the log tail is the smallest over channels plus
log(channels), the Bonferroni bound for "some channel has a run this unlikely".
"""

from __future__ import annotations

import math
from typing import Any

from sensorwatch.scoring.components.common import jit
from sensorwatch.scoring.state import CHANNELS, Field, offsets_type

NAME = "stuck_check"
#: Octaves of run length learnt (runs of 1, 2, 4, … 2^(OCTAVES−1) = 2,048 repeats; a longer run
#: is as unlikely as one of 2,048: 34 minutes at 1 Hz, a week at 5 minutes).
OCTAVES = 12


def _octaves(channels: int, cfg: Any) -> tuple[int, ...]:
    return (channels, OCTAVES)


STATE = (
    Field("previous", CHANNELS, math.nan),
    Field("run", CHANNELS),
    Field("chances", CHANNELS),  # comparisons right after a change (a run may start)
    Field("survived", _octaves),  # runs that reached 2^k repeats, channel-major
    Field("compared", CHANNELS),  # every comparison with the previous value
    Field("repeats", CHANNELS),  # … that was a repeat
    Field("flagged", CHANNELS),  # 1 while the current run is a stuck hit (left out of the counts)
)
Offsets = offsets_type(STATE)
LN2 = math.log(2.0)
#: Weight of a flagged run in the counts once it has ended: a freeze does not make the next freeze
#: look normal, yet a flat stretch that recurs (a daily idle hour) is learnt within a few times.
FLAGGED_WEIGHT = 0.5


def enabled(setup: object) -> bool:
    return bool(setup.cfg.stuck_check)  # type: ignore[attr-defined]


@jit
def run_log_tail(row, o, j, run, own):
    """log P(run ≥ ``run``) on channel ``j`` from its history, the current run (counted ``own``
    times, 1 or 0) left out."""
    base = o.survived + j * OCTAVES
    s_prev = row[base] - own  # the current run has passed octave 0
    log_start = math.log((s_prev + 1.0) / (row[o.chances + j] + 2.0))
    log_p = math.log((row[o.repeats + j] + 1.0) / (row[o.compared + j] + 2.0))
    # Whether the channel has had runs of its own: one past run of 2 repeats or more (a flagged one
    # counts half, so one freeze does not make the channel a "flat" one).
    has_runs = row[base + 1] - (own if run >= 2.0 else 0.0) >= 1.0
    out = log_start
    octave = math.log(run) / LN2
    last = -LN2  # the factor of the last octave with data (½ when none)
    k = 1
    while k < OCTAVES and k - 1 < octave:
        s_k = row[base + k]
        if k <= octave:
            s_k -= own  # … and this one
        # A channel with runs of its own: their share, and beyond its longest the last octave's
        # factor again (a tail keeps falling as it did); one without: independent repeats at rate
        # p (p^(2^(k−1)) to double the run).
        if not has_runs:
            step = log_p * 2.0 ** (k - 1)
        elif s_prev > 0.0:
            step = math.log((s_k + 1.0) / (s_prev + 2.0))
            last = min(step, -LN2)
        else:
            step = last
        out += step * min(octave - (k - 1), 1.0)
        s_prev = s_k
        k += 1
    return out


@jit
def _count_run(row, o, j, run, weight):
    """Add ``weight`` to every octave a run of ``run`` repeats has reached on channel ``j``."""
    base = o.survived + j * OCTAVES
    k = 0
    while k < OCTAVES and 2.0**k <= run:
        row[base + k] += weight
        k += 1


@jit
def _learn(row, o, j, was, rep, run, window):
    n = row[o.compared + j] + 1.0
    r = row[o.repeats + j] + (1.0 if rep else 0.0)
    if n >= window:
        n, r = 0.5 * n, 0.5 * r
    row[o.compared + j], row[o.repeats + j] = n, r
    if was == 0.0:  # a comparison right after a change: a chance for a run
        n = row[o.chances + j] + 1.0
        if n >= window:  # halve the memory
            n *= 0.5
            base = o.survived + j * OCTAVES
            for k in range(OCTAVES):
                row[base + k] *= 0.5
        row[o.chances + j] = n
    if not rep:
        if row[o.flagged + j] != 0.0 and was > 0.0:  # a flagged run ended: it teaches at half weight
            _count_run(row, o, j, was, FLAGGED_WEIGHT)
        row[o.flagged + j] = 0.0  # the run (if any) has ended
    elif row[o.flagged + j] == 0.0:
        octave = math.log(run) / LN2
        k = int(octave)
        if k < OCTAVES and octave == k:  # run is a power of two: it reached octave k
            row[o.survived + j * OCTAVES + k] += 1.0


@jit
def log_tail(row, o, x, observed, window, cut):
    """The smallest log tail over channels plus log(channels); a run whose own tail reaches ``cut``
    (a hit) is taken out of its channel's counts while it lasts (and counts half once it ended,
    :func:`_learn`), so a stuck episode does not teach the check that such runs are normal."""
    out = 0.0
    bonferroni = math.log(x.size)
    for j in range(x.size):
        prev = row[o.previous + j]
        cmp = observed[j] and math.isfinite(prev)
        rep = cmp and x[j] == prev
        was = row[o.run + j]
        run = was + 1.0 if rep else (0.0 if cmp else was)
        if cmp:
            _learn(row, o, j, was, rep, run, window)
        if run > 0:
            flagged = row[o.flagged + j] != 0.0
            tail = run_log_tail(row, o, j, run, 0.0 if flagged else 1.0)
            if not flagged and tail + bonferroni <= cut:
                row[o.flagged + j] = 1.0
                _count_run(row, o, j, run, -1.0)  # out of the counts while it lasts
            out = min(out, tail)
        row[o.run + j] = run
        if observed[j]:
            row[o.previous + j] = x[j]
    return min(out + bonferroni, 0.0) if out < 0.0 else 0.0
