"""Comparison helpers shared by the engine tests (see test_contract's docstring for the tolerances)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck

from sensorwatch import ReadingBatch, StepResult, StreamScorer

#: Numeric result columns and the (rtol, atol) they are compared with.
NUMERIC_TOL: dict[str, tuple[float, float]] = {
    "predicted": (1e-5, 1e-5),
    "z": (1e-4, 1e-4),
    "raw_score": (1e-5, 1e-5),
    "smoothed_score": (1e-5, 1e-5),
    "threshold": (1e-5, 1e-5),
    "likelihood": (1e-5, 1e-5),
    "attribution": (1e-4, 1e-4),
}
BOOL_COLUMNS = ("is_anomaly", "warming_up", "gap_reset", "imputed", "accepted")
#: The per-reading arrays of a StepResult when the golden outputs were frozen.
FROZEN_COLUMNS = ("ts", "reason", *NUMERIC_TOL, *BOOL_COLUMNS)
#: Every per-reading array of a StepResult (``kind`` and ``value`` came with the spike check).
ARRAY_COLUMNS = (*FROZEN_COLUMNS, "kind", "value", "continues", "ended", "severity")

T0 = 1_700_000_000.0
#: Health checks the hypothesis contract tests suppress (fixtures per example, slow scorers, big data).
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float | np.ndarray) -> None:
    """Elementwise ``|got − want| ≤ atol + rtol·|want|``, with NaN == NaN and ±inf == ±inf."""
    assert got.shape == want.shape, name
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_g, nan_w), f"{name}: NaN pattern differs at {np.argwhere(nan_g != nan_w)[:5]}"
    inf = np.isinf(got) | np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), f"{name}: infinities differ"
    fin = ~(nan_g | inf)
    err = np.abs(got[fin] - want[fin])
    bound = (atol + rtol * np.abs(want))[fin]
    if (err > bound).any():
        worst = int(np.argmax(err - bound))
        raise AssertionError(
            f"{name}: {int((err > bound).sum())} values differ; worst |Δ|={err[worst]:.3g} "
            f"(got {got[fin][worst]!r}, want {want[fin][worst]!r})"
        )


def channel_magnitude(values: np.ndarray) -> np.ndarray:
    """max(1, max |value|) per channel over the finite values of a batch."""
    finite = np.where(np.isfinite(values), np.abs(values), 0.0)
    return np.maximum(1.0, finite.max(axis=0, initial=0.0))


def assert_results_match(
    got: StepResult, want: StepResult, *, exact: bool = False, magnitude: np.ndarray | None = None
) -> None:
    """Same rejections, flags and (up to float32 noise, or ``exact``) numbers.

    ``magnitude`` (C,) scales the absolute tolerance of ``predicted`` (see module docstring).
    """
    assert got.device_ids == want.device_ids
    np.testing.assert_array_equal(got.ts, want.ts)
    np.testing.assert_array_equal(got.reason, want.reason)
    for col, (rtol, atol) in NUMERIC_TOL.items():
        if exact:
            np.testing.assert_array_equal(getattr(got, col), getattr(want, col), err_msg=col)
            continue
        tol = atol * magnitude[None, :] if col == "predicted" and magnitude is not None else atol
        assert_close(col, getattr(got, col), getattr(want, col), rtol, tol)
    for col in (*BOOL_COLUMNS, "kind", "value", "continues", "ended", "severity"):
        np.testing.assert_array_equal(getattr(got, col), getattr(want, col), err_msg=col)


def concat_results(parts: list[StepResult]) -> StepResult:
    """One StepResult from consecutive step results (in order)."""
    first = parts[0]
    return StepResult(
        device_ids=[d for p in parts for d in p.device_ids],
        model_version=first.model_version,
        channel_names=first.channel_names,
        **{col: np.concatenate([getattr(p, col) for p in parts]) for col in ARRAY_COLUMNS},
    )


def take(result: StepResult, index: np.ndarray) -> StepResult:
    """The entries ``index`` (a bool mask or an index array) of a result, in that order."""
    positions = np.arange(len(result))[index]
    return StepResult(
        device_ids=[result.device_ids[i] for i in positions.tolist()],
        model_version=result.model_version,
        channel_names=result.channel_names,
        **{col: getattr(result, col)[positions] for col in ARRAY_COLUMNS},
    )


def step_in_chunks(scorer: StreamScorer, batch: ReadingBatch, cuts: list[int]) -> StepResult:
    bounds = [0, *sorted(cuts), len(batch)]
    parts = [
        scorer.step(ReadingBatch(batch.device_ids[a:b], batch.ts[a:b], batch.values[a:b]))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    return concat_results(parts)


def random_history(
    rng: np.random.Generator, devices: list[str], per_device: int, t0: float = T0
) -> ReadingBatch:
    """Interleaved readings (2 channels, a few missing) of several devices, strictly increasing per device."""
    ids, ts, vals = [], [], []
    clock = dict.fromkeys(devices, t0)
    for _ in range(per_device):
        for d in rng.permutation(devices).tolist():
            clock[d] += float(rng.uniform(1.0, 600.0))
            v = rng.normal(size=2) * [1.0, 5.0] + [0.0, 20.0]
            if rng.random() < 0.1:
                v[rng.integers(2)] = np.nan
            ids.append(d)
            ts.append(clock[d])
            vals.append(v)
    return ReadingBatch(ids, np.array(ts), np.array(vals))
