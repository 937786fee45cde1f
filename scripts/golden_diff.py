"""Worst differences between the scorer's outputs and the golden files (``tests/engine/golden``).

``python scripts/golden_diff.py`` prints, per scenario and numeric column, the largest
|got − golden| / max(1, |golden|) and whether flags and reasons are identical.
"""

from __future__ import annotations

import numpy as np

from tests.engine.golden import COLUMNS, GOLDEN_DIR, SCENARIOS, run


def main() -> None:
    for name in SCENARIOS:
        want = np.load(GOLDEN_DIR / f"{name}.npz")
        got = run(name)
        parts = []
        for col in COLUMNS:
            g, w = got[col], want[col]
            if w.dtype.kind in "bU":
                parts.append(f"{col}={'same' if np.array_equal(g.astype(w.dtype), w) else 'DIFFERENT'}")
                continue
            fin = np.isfinite(w) & np.isfinite(g)
            same_nan = np.array_equal(np.isnan(g), np.isnan(w))
            err = np.abs(g[fin] - w[fin]) / np.maximum(1.0, np.abs(w[fin]))
            worst = float(err.max(initial=0.0))
            exact = float((err == 0).mean()) if err.size else 1.0
            parts.append(
                f"{col}={worst:.1e} ({100 * exact:.1f}% bit-equal{'' if same_nan else ', NaN DIFFER'})"
            )
        print(f"{name}:\n  " + "\n  ".join(parts))


if __name__ == "__main__":
    main()
