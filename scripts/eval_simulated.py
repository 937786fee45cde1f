"""Event recall and false-positive rate of the built-in model on the simulated fleet (seeded).

python scripts/eval_simulated.py — an anomaly event counts as caught when any reading from its start
to 5 readings after its end is flagged; false positives are flagged readings outside events (after
the first 400 readings of each device).
"""

import time

import numpy as np

from sensorwatch import ReadingBatch, StreamScorer
from sensorwatch.simulate import Fleet

for C in [1, 4]:
    f = Fleet(devices=300, channels=C, seed=3, anomaly_rate=0.002)
    s = StreamScorer.builtin(channels=C)
    T = 3000
    L = np.zeros((T, 300), dtype=object)
    A = np.zeros((T, 300), bool)
    t0 = time.perf_counter()
    for k in range(T):
        ids, ts, v, lab = f.step()
        r = s.step(ReadingBatch(ids, ts, v))
        L[k] = lab
        A[k] = r.is_anomaly
    # events
    hits = {}
    tot = {}
    fp = 0
    normal = 0
    for d in range(300):
        lab = L[:, d]
        k = 0
        while k < T:
            if lab[k]:
                kind = lab[k]
                e = k
                while e < T and lab[e] == kind:
                    e += 1
                tot[kind] = tot.get(kind, 0) + 1
                if A[k : min(T, e + 5), d].any():
                    hits[kind] = hits.get(kind, 0) + 1
                k = e + 5
            else:
                if k >= 400:
                    normal += 1
                    fp += A[k, d]
                k += 1
    print(
        C,
        "channels",
        {k: f"{hits.get(k, 0)}/{v}" for k, v in tot.items()},
        "FP per 1000 normal:",
        round(1000 * fp / normal, 2),
        f"{time.perf_counter() - t0:.0f}s",
    )
