"""The candidates for the scoring hot path, measured on this machine (docs/scoring-core.md).

    .venv/bin/python scripts/hot_path_candidates.py

Prints the median cost of: one small torch elementwise op (what the torch implementation made ~200
of per wave), one numpy ufunc into a preallocated buffer, one call of the fused numba wave kernel
for 1 reading, and the kernel's cost per reading at 10,000 readings — each for the default config
and the built-in model. A measurement tool, not a test.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sensorwatch import ReadingBatch, StepResult, StreamScorer
from sensorwatch.scoring import kernel


def per_call_us(fn: Callable[[], object], calls: int, trials: int = 7) -> float:
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rates)


def kernel_call(n: int) -> Callable[[], object]:
    """One call of the fused wave kernel over ``n`` devices' readings (state prepared by two steps)."""
    scorer = StreamScorer.builtin()
    ids = [f"d{i}" for i in range(n)]
    values = np.random.default_rng(0).standard_normal((n, 1))
    for k in range(2):
        scorer.step(ReadingBatch(ids, np.full(n, 1e9 + 60.0 * k), values))
    cols = scorer.store.columns
    rows = np.arange(n, dtype=np.int64)
    st = cols["state"].numpy().take(rows, axis=0)
    mem32, mem64 = cols["memory32"].numpy(), cols["memory64"].numpy()
    batch = ReadingBatch(ids, np.full(n, 1e9 + 180.0), values)
    r = StepResult.empty(batch, 1, "x", ("ch0",))
    feats = np.empty((n, 3), dtype=np.float32)
    centre, scale, gaps = np.empty((n, 1)), np.empty((n, 1)), np.empty(n, dtype=np.bool_)
    undo, undo_n = kernel.undo_log(n, 4)

    def call() -> None:
        undo_n[:] = 0
        kernel.wave(
            st, rows, mem32, mem64, rows, rows, batch.values, batch.ts, scorer._params, scorer._offsets,
            scorer._zs, feats, centre, scale, gaps, undo, undo_n, *kernel.outputs(r),
        )  # fmt: skip

    return call


def main() -> int:
    t = torch.zeros(1, dtype=torch.float64)
    a, out = np.zeros(1), np.zeros(1)
    with torch.inference_mode():
        torch_op = per_call_us(lambda: t * 2.0, 20_000)
    numpy_op = per_call_us(lambda: np.multiply(a, 2.0, out=out), 20_000)
    one = per_call_us(kernel_call(1), 20_000)
    big = per_call_us(kernel_call(10_000), 30) / 10_000
    print(f"torch elementwise op (1 element):        {torch_op:8.2f} µs")
    print(f"numpy ufunc into a buffer (1 element):   {numpy_op:8.2f} µs")
    print(f"fused kernel, 1 reading (one call):      {one:8.2f} µs")
    print(f"fused kernel, per reading at 10,000:     {big:8.3f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
