"""How much do the seasonal check's constants matter on NAB, and does their choice hold across categories?

OMP_NUM_THREADS=1 python scripts/nab_sensitivity.py [--nab ../shared/data/nab-dev] [--model builtin]
                                                    [--json out/nab-sensitivity.json]

Streams nab-dev through the production scorer (``sensorwatch.evaluation.cli.evaluate``) once per
variant — the defaults, each seasonal-check constant varied once, the check off — and prints

* the NAB score of each variant (three profiles);
* the standard score per labelled category, each category scored with its own threshold (the
  anomaly-free ``artificialNoAnomaly`` files are added to every category: they only cost false
  positives);
* leave one category out: the variant that scores best on the other two categories, and what it
  scores on the held-out one — against the defaults there. If picking constants on two categories
  gives about what the defaults give on the third, the constants are not what makes the score.

About 25 s per variant on one core (nine variants).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sensorwatch.evaluation.cli import evaluate
from sensorwatch.evaluation.nab import NabFile, score_corpus
from sensorwatch.scoring.config import config_with

VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "bin 5 min": ["seasonal_bin_s=300"],
    "bin 15 min": ["seasonal_bin_s=900"],
    "bin 30 min": ["seasonal_bin_s=1800"],
    "bin 2 h": ["seasonal_bin_s=7200"],
    "level weight 0.05": ["seasonal_level_alpha=0.05"],
    "level weight 0.2": ["seasonal_level_alpha=0.2"],
    "weekly period": ["seasonal_period_s=604800"],
    "no seasonal check": ["seasonal_check=false"],
}
CATEGORIES = ("artificialWithAnomaly", "realAdExchange", "realKnownCause")
QUIET = "artificialNoAnomaly"


def category_score(files: list[NabFile], scores: dict[str, np.ndarray], cats: tuple[str, ...]) -> float:
    sub = [f for f in files if f.relpath.split("/")[0] in (*cats, QUIET)]
    return score_corpus(sub, scores, "standard").normalized


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nab", default="../shared/data/nab-dev")
    p.add_argument("--model", default=None, help="model reference or 'builtin' (default: the default model)")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    results: dict[str, dict[str, object]] = {}
    per_cat: dict[str, dict[str, float]] = {}
    streamed: dict[str, tuple[list[NabFile], dict[str, np.ndarray]]] = {}
    print(
        f"{'variant':<20}{'standard':>10}{'low FP':>10}{'low FN':>10}  "
        + "".join(f"{c:>24}" for c in CATEGORIES)
    )
    for name, overrides in VARIANTS.items():
        report, scores, files = evaluate(
            args.nab, args.model, args.models_dir, config_with(overrides), progress=False
        )
        per_cat[name] = {c: category_score(files, scores, (c,)) for c in CATEGORIES}
        results[name] = {"overrides": overrides, "nab": report["nab"], "categories": per_cat[name]}
        nab = report["nab"]
        print(
            f"{name:<20}{nab['standard']:>10.2f}{nab['reward_low_FP_rate']:>10.2f}"
            f"{nab['reward_low_FN_rate']:>10.2f}  "
            + "".join(f"{per_cat[name][c]:>24.1f}" for c in CATEGORIES),
            flush=True,
        )
        streamed[name] = (files, scores)

    print("\nleave one category out (choose the variant on the other two, score the held-out one):")
    loco = {}
    for held in CATEGORIES:
        others = tuple(c for c in CATEGORIES if c != held)
        best = max(VARIANTS, key=lambda v: category_score(*streamed[v], others))
        loco[held] = {"chosen": best, "held_out": per_cat[best][held], "defaults": per_cat["defaults"][held]}
        print(
            f"  {held:<24} chosen: {best:<20} held-out {per_cat[best][held]:.1f}  "
            f"(defaults {per_cat['defaults'][held]:.1f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"variants": results, "leave_one_out": loco}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
