"""Numenta Anomaly Benchmark (NAB v1.0) scoring: windows, scaled sigmoid, one corpus-wide threshold.

Every file is one device streamed row by row; a detector gives each row an ``anomaly_score`` in [0, 1].
For a file of ``N`` rows only rows ``i ≥ P`` are scored, ``P = min(floor(0.15·N), 750)`` (probation).
Labelled anomaly windows ``[l, r]`` (inclusive rows, ``w = r − l + 1``) make a detection at row ``i`` worth

* inside a window: ``A_TP · S(y) / S(−1)`` with ``y = −(r − i + 1) / w`` (earlier is worth more);
* outside windows, before the file's first window: ``−A_FP``;
* outside windows after one: ``A_FP · S(y)`` with ``y = (i − r*) / (w* − 1)``, where ``r*``/``w*`` are the
  end row and width of the most recent window that ended before ``i`` (FPs just after a window cost less);

with the scaled sigmoid ``S(y) = 2 / (1 + e^(5y)) − 1`` (``−1`` for ``y > 3``). At a threshold θ a row is a
detection when its score is ≥ θ; each window counts only its earliest detection (``−A_FN`` when it has
none) and every detection outside windows counts on its own. One θ per profile is chosen for the whole
corpus: every distinct score among scored rows and 1.1 (detect nothing) are tried, the best raw score
wins and ties go to the higher θ. The result is normalised to ``100 · (S − S_null) / (S_perfect − S_null)``
with ``S_perfect = A_TP · windows`` and ``S_null = −A_FN · windows``.

The sweep over thresholds is vectorised: scored rows of the whole corpus are sorted by score (descending)
once, each row's marginal contribution is computed (its own value outside windows, the increase of its
window's running maximum inside — the maximum value is the earliest detection's value), and a cumulative
sum gives the raw score at every candidate threshold at once.

A file of 20 rows (probation 3) with one window on rows 10–14; a detector that fires exactly at the
window's first row is perfect, one that fires at its last row earns S(−1/5)/S(−1) of a true positive:

>>> import numpy as np
>>> f = NabFile.synthetic(20, [(10, 14)])
>>> early = np.zeros(20); early[10] = 1.0
>>> round(score_corpus([f], {f.relpath: early}, "standard").normalized, 3)
100.0
>>> late = np.zeros(20); late[14] = 1.0
>>> res = score_corpus([f], {f.relpath: late}, "standard")
>>> round(res.raw, 4), round(res.normalized, 3), res.threshold, (res.tp, res.fp, res.fn)
(0.4684, 73.419, 1.0, (1, 0, 0))
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "NO_DETECTION_THRESHOLD",
    "PROFILES",
    "NabFile",
    "NabResult",
    "event_metrics",
    "load_corpus",
    "load_reference_scores",
    "probation_length",
    "scaled_sigmoid",
    "score_all_profiles",
    "score_at_threshold",
    "score_corpus",
]

Profile = tuple[float, float, float]

#: Cost profiles as ``(A_TP, A_FP, A_FN)``.
PROFILES: dict[str, Profile] = {
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
}

#: The threshold that detects nothing (scores are in [0, 1]); always among the candidates.
NO_DETECTION_THRESHOLD = 1.1

PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750


def probation_length(n: int) -> int:
    """Rows at the start of an ``n``-row file that are never scored: ``min(floor(0.15·n), 750)``.

    >>> probation_length(4032), probation_length(22695), probation_length(10)
    (604, 750, 1)
    """
    return int(min(math.floor(PROBATION_FRACTION * n), PROBATION_MAX_ROWS))


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """``S(y) = 2 / (1 + e^(5y)) − 1`` for ``y ≤ 3`` and ``−1`` beyond.

    >>> [round(float(v), 5) for v in scaled_sigmoid(np.array([-1.0, 0.0, 1.0, 3.5]))]
    [0.98661, 0.0, -0.98661, -1.0]
    """
    arr = np.asarray(y, dtype=np.float64)
    s = 2.0 / (1.0 + np.exp(5.0 * np.minimum(arr, 3.0))) - 1.0
    return np.where(arr > 3.0, -1.0, s)


_S_MINUS_1 = float(scaled_sigmoid(-1.0))


def _parse_ts(stamps: Sequence[str]) -> np.ndarray:
    """Unix seconds (float64) from ``YYYY-MM-DD HH:MM:SS[.ffffff]`` strings; naive times are UTC."""
    if len(stamps) == 0:
        return np.zeros(0, dtype=np.float64)
    us = np.array([s.strip() for s in stamps], dtype="datetime64[us]").astype(np.int64)
    return us.astype(np.float64) / 1e6


def _format_ts(ts: np.ndarray) -> list[str]:
    dt = (np.asarray(ts, dtype=np.float64) * 1e6).astype(np.int64).astype("datetime64[us]")
    return [s.replace("T", " ") for s in np.datetime_as_string(dt, unit="s")]


@dataclass(frozen=True, eq=False)
class NabFile:
    """One NAB data file: its rows and its labelled anomaly windows as inclusive row ranges."""

    relpath: str
    timestamps: list[str]
    ts: np.ndarray
    values: np.ndarray
    windows: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.timestamps)
        if self.ts.shape != (n,) or self.values.shape != (n,):
            raise ValueError(f"{self.relpath}: timestamps, ts and values must have the same length")
        prev_end = -1
        for start, end in self.windows:
            if not (prev_end < start <= end < n):
                raise ValueError(
                    f"{self.relpath}: windows must be sorted, disjoint, non-empty row ranges within "
                    f"[0, {n}); got {self.windows}"
                )
            prev_end = end

    @property
    def n(self) -> int:
        """Number of rows."""
        return len(self.timestamps)

    @property
    def probation(self) -> int:
        """Rows ``0 … probation − 1`` are not scored."""
        return probation_length(self.n)

    @classmethod
    def synthetic(
        cls,
        n: int,
        windows: Sequence[tuple[int, int]] = (),
        relpath: str = "synthetic/file.csv",
        start: str = "2020-01-01 00:00:00",
        step_s: float = 300.0,
    ) -> NabFile:
        """A file of ``n`` evenly spaced rows (values 0) with the given windows, for tests and examples."""
        ts = _parse_ts([start])[0] + step_s * np.arange(n, dtype=np.float64)
        return cls(relpath, _format_ts(ts), ts, np.zeros(n), [(int(a), int(b)) for a, b in windows])


@dataclass(frozen=True)
class NabResult:
    """NAB score of one detector under one profile at one threshold.

    ``tp``/``fn`` count windows (detected / missed), ``fp`` counts detected rows outside windows (as NAB
    does). ``windows`` is the number of windows with at least one scored row; ``null``/``perfect`` are
    the normalisation anchors. ``per_file`` holds each file's raw contribution.
    """

    profile: str
    normalized: float
    raw: float
    threshold: float
    tp: int
    fp: int
    fn: int
    windows: int
    null: float
    perfect: float
    per_file: dict[str, float] = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------------------------------------- loading


def _read_csv_columns(path: Path, columns: Sequence[str]) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty CSV") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        idx = [header.index(c) for c in columns]
        out: list[list[str]] = [[] for _ in columns]
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            for k, j in enumerate(idx):
                out[k].append(row[j].strip())
    return out


def _window_rows(ts: np.ndarray, start: str, end: str, relpath: str) -> tuple[int, int]:
    """Inclusive row range from the first to the last row whose timestamp lies in ``[start, end]``.

    A mask rather than a binary search: real NAB files have a few repeated or slightly out-of-order
    timestamps (none inside a window), so ``ts`` is not assumed to be sorted.
    """
    t0, t1 = _parse_ts([start, end])
    hit = np.flatnonzero((ts >= t0) & (ts <= t1))
    if hit.size == 0:
        raise ValueError(f"{relpath}: window [{start}, {end}] contains no rows")
    return int(hit[0]), int(hit[-1])


def load_corpus(root: str | Path) -> list[NabFile]:
    """All ``data/<category>/<file>.csv`` under ``root`` with windows from ``labels/combined_windows.json``.

    Files come sorted by relpath; every data file must have a labels entry (possibly empty).
    """
    root = Path(root)
    with (root / "labels" / "combined_windows.json").open(encoding="utf-8") as fh:
        labels: dict[str, list[list[str]]] = json.load(fh)
    files: list[NabFile] = []
    data_dir = root / "data"
    for path in sorted(data_dir.glob("*/*.csv")):
        relpath = path.relative_to(data_dir).as_posix()
        if relpath not in labels:
            raise ValueError(f"{relpath}: no entry in combined_windows.json")
        stamps, vals = _read_csv_columns(path, ("timestamp", "value"))
        ts = _parse_ts(stamps)
        windows = [_window_rows(ts, s, e, relpath) for s, e in labels[relpath]]
        files.append(NabFile(relpath, stamps, ts, np.array(vals, dtype=np.float64), windows))
    if not files:
        raise FileNotFoundError(f"no data/<category>/<file>.csv under {root}")
    return files


def load_reference_scores(root: str | Path, detector: str) -> dict[str, np.ndarray]:
    """``anomaly_score`` columns of ``reference-results/<detector>/<category>/<file>.csv``, keyed by relpath.

    NAB's own results name files ``<detector>_<file>.csv``; such a prefix is stripped so that keys match
    :func:`load_corpus` relpaths.
    """
    base = Path(root) / "reference-results" / detector
    out: dict[str, np.ndarray] = {}
    for path in sorted(base.glob("*/*.csv")):
        name = path.name.removeprefix(f"{detector}_")
        (scores,) = _read_csv_columns(path, ("anomaly_score",))
        out[f"{path.parent.name}/{name}"] = np.array(scores, dtype=np.float64)
    if not out:
        raise FileNotFoundError(f"no reference results under {base}")
    return out


# ---------------------------------------------------------------------------------------------- scoring


def _row_values(f: NabFile) -> tuple[np.ndarray, np.ndarray]:
    """Unweighted per-row detection values and window ids (−1 outside windows).

    Inside windows the value is ``S(y)/S(−1)`` (multiply by A_TP), outside it is ``−1`` or ``S(y)``
    (multiply by A_FP).
    """
    n = f.n
    rows = np.arange(n, dtype=np.float64)
    wid = np.full(n, -1, dtype=np.int64)
    if not f.windows:
        return np.full(n, -1.0), wid
    ends = np.array([e for _, e in f.windows], dtype=np.int64)
    widths = np.array([e - s + 1 for s, e in f.windows], dtype=np.float64)
    # Most recent window that ended before each row (−1: none yet → y = ∞ → S = −1).
    prev = np.searchsorted(ends, np.arange(n), side="left") - 1
    has_prev = prev >= 0
    k = np.where(has_prev, prev, 0)
    # A one-row window would divide by zero (NAB raises); its successors are scored with w* − 1 := 1.
    denom = np.maximum(widths[k] - 1.0, 1.0)
    y = np.where(has_prev, (rows - ends[k]) / denom, np.inf)
    u = scaled_sigmoid(y)
    for j, (lo, hi) in enumerate(f.windows):
        w = hi - lo + 1
        i = np.arange(lo, hi + 1, dtype=np.float64)
        u[lo : hi + 1] = scaled_sigmoid(-(hi - i + 1) / w) / _S_MINUS_1
        wid[lo : hi + 1] = j
    return u, wid


def _checked_scores(f: NabFile, scores: Mapping[str, np.ndarray]) -> np.ndarray:
    if f.relpath not in scores:
        raise KeyError(f"no anomaly scores for {f.relpath}")
    s = np.asarray(scores[f.relpath], dtype=np.float64)
    if s.shape != (f.n,):
        raise ValueError(f"{f.relpath}: {s.shape[0] if s.ndim == 1 else s.shape} scores for {f.n} rows")
    if not np.all(np.isfinite(s[f.probation :])):
        raise ValueError(f"{f.relpath}: non-finite anomaly scores after probation")
    return s


@dataclass(frozen=True, eq=False)
class _Sweep:
    """Scored rows of a corpus sorted by descending anomaly score (profile independent)."""

    score: np.ndarray  # descending
    unweighted: np.ndarray  # row value before profile weights
    in_window: np.ndarray  # bool
    groups: list[np.ndarray]  # per scorable window: its rows' positions in sorted order, ascending
    n_windows: int

    @classmethod
    def build(cls, files: Sequence[NabFile], scores: Mapping[str, np.ndarray]) -> _Sweep:
        s_parts, u_parts, w_parts = [], [], []
        offset = 0
        for f in files:
            s = _checked_scores(f, scores)
            u, wid = _row_values(f)
            p = f.probation
            s_parts.append(s[p:])
            u_parts.append(u[p:])
            w_parts.append(np.where(wid[p:] >= 0, wid[p:] + offset, -1))
            offset += len(f.windows)
        score = np.concatenate(s_parts) if s_parts else np.zeros(0)
        order = np.argsort(-score, kind="stable")
        wid_sorted = np.concatenate(w_parts)[order] if w_parts else np.zeros(0, dtype=np.int64)
        in_window = wid_sorted >= 0
        # Group window rows by window id, keeping sorted (descending score) order within each group.
        pos = np.flatnonzero(in_window)
        by_window = pos[np.argsort(wid_sorted[pos], kind="stable")]
        ids = wid_sorted[by_window]
        cuts = np.flatnonzero(np.diff(ids)) + 1
        groups = np.split(by_window, cuts) if by_window.size else []
        return cls(score[order], np.concatenate(u_parts)[order], in_window, groups, len(groups))

    def totals(self, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
        """Candidate thresholds (descending, 1.1 included) and the raw corpus score at each."""
        a_tp, a_fp, a_fn = profile
        contrib = np.where(self.in_window, 0.0, a_fp * self.unweighted)
        for g in self.groups:
            best = np.maximum.accumulate(a_tp * self.unweighted[g])
            contrib[g] = best - np.concatenate(([-a_fn], best[:-1]))
        csum = np.concatenate(([0.0], np.cumsum(contrib)))
        cand = np.unique(np.concatenate((self.score, [NO_DETECTION_THRESHOLD])))[::-1]
        detected = np.searchsorted(-self.score, -cand, side="right")
        return cand, -a_fn * self.n_windows + csum[detected]


def _profile(profile: str | Profile) -> tuple[str, Profile]:
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
        return profile, PROFILES[profile]
    a_tp, a_fp, a_fn = (float(x) for x in profile)
    return "custom", (a_tp, a_fp, a_fn)


def score_at_threshold(
    files: Sequence[NabFile],
    scores: Mapping[str, np.ndarray],
    profile: str | Profile,
    threshold: float,
) -> NabResult:
    """NAB score at a fixed threshold (rows with ``score ≥ threshold`` are detections), file by file."""
    name, (a_tp, a_fp, a_fn) = _profile(profile)
    raw = 0.0
    tp = fp = n_windows = 0
    per_file: dict[str, float] = {}
    for f in files:
        s = _checked_scores(f, scores)
        u, wid = _row_values(f)
        p = f.probation
        det = np.zeros(f.n, dtype=bool)
        det[p:] = s[p:] >= threshold
        outside = det & (wid < 0)
        total = float(np.sum(a_fp * u[outside]))
        fp += int(np.count_nonzero(outside))
        for lo, hi in f.windows:
            lo_s = max(lo, p)
            if lo_s > hi:
                continue  # entirely in probation: neither detectable nor missable
            n_windows += 1
            hits = np.flatnonzero(det[lo_s : hi + 1])
            if hits.size:
                tp += 1
                total += a_tp * float(u[lo_s + hits[0]])
            else:
                total -= a_fn
        per_file[f.relpath] = total
        raw += total
    return _result(name, (a_tp, a_fp, a_fn), raw, float(threshold), tp, fp, n_windows, per_file)


def _result(
    name: str,
    profile: Profile,
    raw: float,
    threshold: float,
    tp: int,
    fp: int,
    n_windows: int,
    per_file: dict[str, float],
) -> NabResult:
    a_tp, _, a_fn = profile
    perfect, null = a_tp * n_windows, -a_fn * n_windows
    normalized = 100.0 * (raw - null) / (perfect - null) if perfect != null else math.nan
    return NabResult(
        name, normalized, raw, threshold, tp, fp, n_windows - tp, n_windows, null, perfect, per_file
    )


def _best(
    sweep: _Sweep, files: Sequence[NabFile], scores: Mapping[str, np.ndarray], profile: str | Profile
) -> NabResult:
    name, weights = _profile(profile)
    cand, totals = sweep.totals(weights)
    k = int(np.argmax(totals))  # first maximum = highest threshold among ties
    res = score_at_threshold(files, scores, weights, float(cand[k]))
    # The file-by-file rescoring is an independent check of the sweep.
    assert abs(res.raw - float(totals[k])) <= 1e-6 * max(1.0, abs(res.raw)), (res.raw, float(totals[k]))
    return _result(name, weights, float(totals[k]), res.threshold, res.tp, res.fp, res.windows, res.per_file)


def score_corpus(
    files: Sequence[NabFile], scores: Mapping[str, np.ndarray], profile: str | Profile = "standard"
) -> NabResult:
    """NAB score of ``scores`` (relpath → per-row anomaly scores) under one profile, best threshold."""
    return _best(_Sweep.build(files, scores), files, scores, profile)


def score_all_profiles(files: Sequence[NabFile], scores: Mapping[str, np.ndarray]) -> dict[str, NabResult]:
    """:func:`score_corpus` for every profile in :data:`PROFILES` (the sort is shared)."""
    sweep = _Sweep.build(files, scores)
    return {name: _best(sweep, files, scores, name) for name in PROFILES}


# ---------------------------------------------------------------------------------------------- events


def event_metrics(
    files: Sequence[NabFile], scores: Mapping[str, np.ndarray], threshold: float
) -> dict[str, float]:
    """Event-wise detection quality at ``threshold`` (probation rows are ignored throughout).

    A window (with at least one scored row) is detected when any of its scored rows has score ≥
    ``threshold``; a false-positive event is a maximal run of consecutive flagged rows outside windows.
    ``precision = detected / (detected + fp_events)``, ``recall = detected / windows`` (0 when undefined);
    delays run from the window's first row to its first detection, averaged over detected windows (NaN
    when none is detected).

    >>> f = NabFile.synthetic(40, [(20, 29)])
    >>> s = np.zeros(40); s[[10, 11, 23, 35]] = 1.0
    >>> m = event_metrics([f], {f.relpath: s}, 0.5)
    >>> m["detected"], m["fp_events"], m["precision"], m["recall"], m["mean_delay_rows"], m["mean_delay_s"]
    (1, 2, 0.3333333333333333, 1.0, 3.0, 900.0)
    """
    windows = detected = fp_events = fp_rows = 0
    delays_rows: list[float] = []
    delays_s: list[float] = []
    for f in files:
        s = _checked_scores(f, scores)
        p = f.probation
        flagged = np.zeros(f.n, dtype=bool)
        flagged[p:] = s[p:] >= threshold
        inside = np.zeros(f.n, dtype=bool)
        for lo, hi in f.windows:
            inside[lo : hi + 1] = True
            lo_s = max(lo, p)
            if lo_s > hi:
                continue
            windows += 1
            hits = np.flatnonzero(flagged[lo_s : hi + 1])
            if hits.size:
                detected += 1
                first = lo_s + int(hits[0])
                delays_rows.append(float(first - lo))
                delays_s.append(float(f.ts[first] - f.ts[lo]))
        fp_mask = flagged & ~inside
        fp_rows += int(np.count_nonzero(fp_mask))
        fp_events += int(np.count_nonzero(np.diff(fp_mask.astype(np.int8), prepend=0) == 1))
    precision = detected / (detected + fp_events) if detected + fp_events else 0.0
    recall = detected / windows if windows else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold),
        "windows": windows,
        "detected": detected,
        "missed": windows - detected,
        "fp_events": fp_events,
        "fp_rows": fp_rows,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_delay_rows": float(np.mean(delays_rows)) if delays_rows else math.nan,
        "mean_delay_s": float(np.mean(delays_s)) if delays_s else math.nan,
    }
