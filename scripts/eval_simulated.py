"""Event recall and false-positive rate on the simulated fleet (seeded), per anomaly kind.

python scripts/eval_simulated.py [--point] [--scorer KEY=VALUE ...] [MODEL ...] — MODEL is a model
reference (``univariate``, ``univariate/1``, ``machine8``) or ``builtin``; ``--point`` turns on the
opt-in ``point_likelihood``, ``--scorer`` overrides any scorer setting (e.g. ``seasonal_check=false``).
An anomaly event counts as caught when any reading from its start to 5 readings after its end is
flagged; false positives are flagged readings outside events, after the first 400 readings of each
device (in brackets: by the kind the scorer gave them). The fleet is a different seed from the models'
training data.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sensorwatch import ReadingBatch, ScorerConfig, StreamScorer
from sensorwatch.artifacts import load_model
from sensorwatch.scoring.batch import KINDS
from sensorwatch.scoring.config import config_with
from sensorwatch.simulate import Fleet

DEVICES, READINGS, SKIP = 300, 3000, 400


def evaluate(ref: str, channels: int, config: ScorerConfig) -> str:
    if ref == "builtin":
        scorer = StreamScorer.builtin(channels=channels, config=config)
    else:
        m = load_model(ref)
        channels = m.model.config.channels
        scorer = StreamScorer(m.model, config, model_version=m.ref)
    fleet = Fleet(devices=DEVICES, channels=channels, seed=3, anomaly_rate=0.002)
    labels = np.zeros((READINGS, DEVICES), dtype=object)
    flags = np.zeros((READINGS, DEVICES), bool)
    found = np.zeros((READINGS, DEVICES), np.int8)
    t0 = time.perf_counter()
    for k in range(READINGS):
        ids, ts, v, lab = fleet.step()
        res = scorer.step(ReadingBatch(ids, ts, v))
        flags[k], found[k] = res.is_anomaly, res.kind
        labels[k] = lab
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    fp = normal = 0
    fp_kinds: dict[str, int] = {}
    for d in range(DEVICES):
        lab, k = labels[:, d], 0
        while k < READINGS:
            if lab[k]:
                kind, e = lab[k], k
                while e < READINGS and lab[e] == kind:
                    e += 1
                total[kind] = total.get(kind, 0) + 1
                hits[kind] = hits.get(kind, 0) + int(flags[k : min(READINGS, e + 5), d].any())
                k = e + 5
                continue
            if k >= SKIP:
                normal += 1
                fp += int(flags[k, d])
                if flags[k, d]:
                    name = KINDS[found[k, d]] or "?"
                    fp_kinds[name] = fp_kinds.get(name, 0) + 1
            k += 1
    kinds = " | ".join(f"{kind} {hits.get(kind, 0)}/{n}" for kind, n in sorted(total.items()))
    return (
        f"| {scorer.model_version} | {channels} | {kinds} | {1000 * fp / normal:.2f} "
        f"({', '.join(f'{k} {1000 * n / normal:.2f}' for k, n in sorted(fp_kinds.items()))}) | "
        f"{time.perf_counter() - t0:.0f} s |"
    )


if __name__ == "__main__":
    print("| model | channels | caught / events per kind | false positives per 1000 normal readings | time |")
    print("|---|---|---|---|---|")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["builtin", "univariate", "machine8"])
    p.add_argument("--point", action="store_true", help="point_likelihood=True")
    p.add_argument("--scorer", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    config = config_with(args.scorer, point_likelihood=args.point)
    for ref in args.models:
        print(evaluate(ref, 1, config), flush=True)
