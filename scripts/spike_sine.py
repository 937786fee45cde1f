"""The six-spike sine of issue #12: a clean daily sine (48 readings per cycle, amplitude 3, noise σ
0.2) with isolated spikes of K σ at rows 100, 150, 250, 400, 700 and 1200, and a clean control;
each scored row by row by one device of the production scorer (shipped default model and options,
or ``KEY=VALUE`` scorer options):

    .venv/bin/python scripts/spike_sine.py [--sigmas 10,30,75] [--seeds 3] [KEY=VALUE ...]

Prints, per spike size and seed, which spikes were flagged at their own reading, and the alerts
raised after warm-up anywhere else (a clean control's count is its false alerts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.scoring.batch import ReadingBatch
from sensorwatch.scoring.config import config_with
from sensorwatch.scoring.scorer import StreamScorer

SPIKES = (100, 150, 250, 400, 700, 1200)
ROWS = 1500
SIGMA = 0.2


def series(sigma_mult: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i = np.arange(ROWS)
    x = 3.0 * np.sin(2 * np.pi * i / 48) + SIGMA * rng.standard_normal(ROWS)
    if sigma_mult:
        x[list(SPIKES)] += sigma_mult * SIGMA
    return x


def score(x: np.ndarray, options: list[str], model_ref: str | None) -> tuple[np.ndarray, int]:
    model, version = load_default_or_builtin(model_ref, None, 1)
    cfg = config_with(options)
    scorer = StreamScorer(model, cfg, model_version=version)
    flags = np.zeros(len(x), dtype=bool)
    ts0 = 1_767_225_600.0
    for i, v in enumerate(x):
        r = scorer.step(ReadingBatch(["d"], [ts0 + 1800.0 * i], [[float(v)]]))
        flags[i] = bool(r.is_anomaly[0])
    return flags, cfg.warmup


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigmas", default="10,30,75")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default=None, help="model reference or 'builtin'")
    ap.add_argument("options", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    total_hit = total_spikes = total_false = 0
    for mult in [0.0, *map(float, args.sigmas.split(","))]:
        for seed in range(args.seeds):
            flags, warmup = score(series(mult, seed), args.options, args.model)
            spikes = [s for s in SPIKES if s >= warmup] if mult else []
            hit = [s for s in spikes if flags[s]]
            others = [int(i) for i in np.flatnonzero(flags) if i >= warmup and i not in spikes]
            total_hit, total_spikes, total_false = (
                total_hit + len(hit),
                total_spikes + len(spikes),
                total_false + len(others),
            )
            name = f"+{mult:g}σ spikes" if mult else "clean control"
            print(
                f"{name:14} seed {seed}: flagged at their row {len(hit)}/{len(spikes)} {hit}; "
                f"other alerts {others[:12]}"
            )
    print(f"total: spikes flagged at their row {total_hit}/{total_spikes}; alerts elsewhere {total_false}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
