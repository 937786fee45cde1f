"""How sharp the forecast is on the simulated fleet: the robust σ of each device's forecast residual
(normal readings after the first 400) over the noise σ the simulator drew for it, median and 10th /
90th percentiles over the devices, per model, with online adaptation on (the default) and off:

    python scripts/residual_ratio.py [MODEL ...]    (``builtin``, ``univariate/2``, ...)

A one-step forecast of white noise around a slow cycle can get close to 1; persistence is √2.
"""

from __future__ import annotations

import argparse

import numpy as np

from sensorwatch import ReadingBatch, StreamScorer
from sensorwatch.artifacts import load_model
from sensorwatch.scoring.config import config_with
from sensorwatch.simulate import Fleet

DEVICES, READINGS, SKIP = 300, 3000, 400


def ratios(ref: str, options: list[str]) -> np.ndarray:
    cfg = config_with(options)
    if ref == "builtin":
        scorer = StreamScorer.builtin(channels=1, config=cfg)
    else:
        scorer = StreamScorer(load_model(ref).model, cfg, model_version=ref)
    fleet = Fleet(devices=DEVICES, channels=1, seed=3, anomaly_rate=0.002)
    resid = np.full((READINGS, DEVICES), np.nan)
    for k in range(READINGS):
        ids, ts, v, labels = fleet.step()
        res = scorer.step(ReadingBatch(ids, ts, v))
        normal = np.array([not lab for lab in labels])
        resid[k, normal] = (v[:, 0] - res.predicted[:, 0])[normal]
    out = np.empty(DEVICES)
    for d in range(DEVICES):
        e = resid[SKIP:, d]
        e = e[np.isfinite(e)]
        out[d] = 1.4826 * np.median(np.abs(e - np.median(e))) / fleet.noise[d, 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["builtin", "univariate/2"])
    args = ap.parse_args()
    print("| model | adaptation | median | p10 | p90 |")
    print("|---|---|---:|---:|---:|")
    for ref in args.models:
        for name, options in (("off", ["adapt_lags=none"]), ("on (default)", [])):
            r = ratios(ref, options)
            p10, med, p90 = np.quantile(r, [0.1, 0.5, 0.9])
            print(f"| {ref} | {name} | {med:.3f} | {p10:.3f} | {p90:.3f} |", flush=True)


if __name__ == "__main__":
    main()
