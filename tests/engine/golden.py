"""Golden outputs of the production scorer, frozen before the scoring core was restructured (#11).

``python -m tests.engine.golden --write`` records every output column of :class:`StreamScorer` for
each scenario below into ``tests/engine/golden/<name>.npz`` and the CPU it ran on into
``golden/machine.json``; ``test_golden.py`` re-runs the scenarios and compares. The files were
written by the torch implementation of the calibration (commit 53452e9) and rewritten once since,
for a change of method with its own measurement (the stuck check's run-length model, #12: see
``docs/scoring-core.md``). They must not be rewritten to make a change pass: a change that moves an
output is a change of behaviour and needs its own measurement.

Scenarios (each streams readings causally, in batches shaped like production traffic):

* ``nab`` — the first 2,000 rows of every nab-dev file, one device per file, one row per step
  (as ``sensorwatch eval nab`` streams them), shipped default model, default config;
* ``fleet`` — a simulated varied fleet (40 devices, 1 channel, 1,500 readings each), 3 readings
  per device per step (several readings of a device in one batch), default model and config;
* ``fleet-threshold`` / ``fleet-point`` — the same fleet (600 readings each) with the ``threshold``
  calibrator, and with ``point_likelihood`` on;
* ``skab`` — three SKAB files (8 channels) through the shipped ``machine8`` GRU, default config;
* ``fleet4-seasonal`` — a 4-channel simulated fleet (16 devices) with missing channels and gaps through a
  randomly initialised *seasonal* LSTM (the model's seasonal memory and step features).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from sensorwatch import ReadingBatch, ScorerConfig, StepResult, StreamScorer
from sensorwatch.artifacts import load_model
from sensorwatch.evaluation.nab import load_corpus
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.simulate import Fleet
from tests.engine.helpers import FROZEN_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
MODELS = ROOT / "models"

#: Every per-reading array of a StepResult that is compared (the batch's own timestamps aside).
COLUMNS = tuple(c for c in FROZEN_COLUMNS if c != "ts")

Batches = Iterator[ReadingBatch]


def _nab() -> tuple[StreamScorer, Batches]:
    files = load_corpus(SHARED / "nab-dev")
    model = load_model("univariate", MODELS).model
    rows = 2000

    def batches() -> Batches:
        for t in range(rows):
            live = [f for f in files if t < len(f.ts)]
            yield ReadingBatch(
                [f.relpath for f in live],
                np.array([f.ts[t] for f in live]),
                np.array([[float(f.values[t])] for f in live]),
            )

    return StreamScorer(model, frozen_config()), batches()


def _fleet_batches(
    channels: int, steps: int, per_batch: int, seed: int, gaps: bool = False, devices: int = 40
) -> Batches:
    fleet = Fleet(devices=devices, channels=channels, seed=seed, profiles="varied", dropout_rate=0.05)
    rng = np.random.default_rng(seed)
    pending: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for k in range(steps):
        ids, ts, values, _ = fleet.step()
        if gaps and k % 97 == 50:
            fleet.ts = fleet.ts + 30_000.0 * (rng.random(len(ids)) < 0.2)
        pending.append((ids, ts, values))
        if len(pending) == per_batch:
            # Interleave the devices' readings (each device's own order kept).
            ids_all = [d for p in pending for d in p[0]]
            ts_all = np.concatenate([p[1] for p in pending])
            val_all = np.concatenate([p[2] for p in pending])
            yield ReadingBatch(ids_all, ts_all, val_all)
            pending = []


def frozen_config(**overrides: object) -> ScorerConfig:
    """The default configuration as it was when the outputs were frozen (53452e9): checks added to
    the defaults since then are off here, so the golden outputs keep guarding the components that
    existed (each new check has tests of its own)."""
    defaults = {"spike_z": None, "adapt_lags": None, "seasonal_return": False}
    return ScorerConfig(**{**defaults, **overrides})  # type: ignore[arg-type]


def _fleet(steps: int, **overrides: object) -> Callable[[], tuple[StreamScorer, Batches]]:
    def make() -> tuple[StreamScorer, Batches]:
        model = load_model("univariate", MODELS).model
        cfg = frozen_config(**overrides)
        return StreamScorer(model, cfg), _fleet_batches(1, steps, 3, seed=7)

    return make


def _read_skab(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open() as fh:
        rows = list(csv.reader(fh))[1:]
    ts = np.array(
        [datetime.fromisoformat(r[0]).replace(tzinfo=timezone.utc).timestamp() for r in rows]  # noqa: UP017
    )
    return ts, np.array([[float(v) for v in r[1:9]] for r in rows])


def _skab() -> tuple[StreamScorer, Batches]:
    files = [SHARED / "mv-dev" / "skab" / f"other_{i}.csv" for i in (1, 2, 3)]
    data = [_read_skab(p) for p in files]
    model = load_model("machine8", MODELS).model

    def batches() -> Batches:
        longest = max(len(ts) for ts, _ in data)
        for t in range(longest):
            live = [(p.stem, ts, v) for p, (ts, v) in zip(files, data, strict=True) if t < len(ts)]
            yield ReadingBatch(
                [n for n, _, _ in live],
                np.array([ts[t] for _, ts, _ in live]),
                np.stack([v[t] for _, _, v in live]),
            )

    return StreamScorer(model, frozen_config()), batches()


def _seasonal_model(channels: int) -> Forecaster:
    model = Forecaster(ForecasterConfig(cell="lstm", hidden_size=16, channels=channels, seasonal=True))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _fleet4_seasonal() -> tuple[StreamScorer, Batches]:
    return StreamScorer(_seasonal_model(4), frozen_config()), _fleet_batches(
        4, 1000, 2, seed=11, gaps=True, devices=16
    )


SCENARIOS: dict[str, Callable[[], tuple[StreamScorer, Batches]]] = {
    "nab": _nab,
    "fleet": _fleet(1500),
    "fleet-threshold": _fleet(600, calibrator="threshold"),
    "fleet-point": _fleet(600, point_likelihood=True),
    "skab": _skab,
    "fleet4-seasonal": _fleet4_seasonal,
}


def run(name: str) -> dict[str, np.ndarray]:
    """Every compared output column of scenario ``name``, concatenated over its steps."""
    scorer, batches = SCENARIOS[name]()
    parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    for batch in batches:
        res: StepResult = scorer.step(batch)
        for c in COLUMNS:
            col = getattr(res, c)
            parts[c].append(col.astype(str) if c == "reason" else col)
    return {c: np.concatenate(v) for c, v in parts.items()}


def cpu_model() -> str:
    """The CPU model name (torch's float32 kernels, and so the forecasts, differ by CPU model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="(re)write the golden files")
    ap.add_argument("names", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args()
    GOLDEN_DIR.mkdir(exist_ok=True)
    if args.write:
        (GOLDEN_DIR / "machine.json").write_text(json.dumps({"cpu": cpu_model()}) + "\n")
    for name in args.names:
        out = run(name)
        if args.write:
            np.savez_compressed(GOLDEN_DIR / f"{name}.npz", **out)
        n, scored, flagged = len(out["accepted"]), int(out["accepted"].sum()), int(out["is_anomaly"].sum())
        print(f"{name}: {n} readings, {scored} scored, {flagged} anomalies")


if __name__ == "__main__":
    main()
