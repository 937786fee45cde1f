"""Stream a corpus (NAB or multichannel) through the production :class:`StreamScorer` — strictly causal.

One device per file, all files side by side as devices of one batch: step t carries row t of every
file that has one. Nothing looks ahead (no file length, min or max): each score is the scorer's
output for that reading given only the rows before it. The anomaly score is the likelihood.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from sensorwatch.scoring.batch import ReadingBatch, StepResult
from sensorwatch.scoring.scorer import StreamScorer


class Streamable(Protocol):
    @property
    def relpath(self) -> str: ...
    @property
    def ts(self) -> np.ndarray: ...
    @property
    def values(self) -> np.ndarray: ...


def stream_steps(
    files: Sequence[Streamable],
    scorer: StreamScorer,
    *,
    rows_per_step: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Streamable, int, int, StepResult, int]]:
    """Step every file side by side, ``rows_per_step`` rows of each per step; yields, per file in a
    step, ``(file, first row, end row, the step's result, the file's offset in it)``."""
    lengths = np.array([len(f.ts) for f in files])
    total = int(lengths.max(initial=0))
    for start in range(0, total, rows_per_step):
        ids: list[str] = []
        ts_parts, val_parts, where = [], [], []
        for f, n in zip(files, lengths, strict=True):
            if start >= n:
                continue
            stop = min(n, start + rows_per_step)
            ids += [f.relpath] * (stop - start)
            ts_parts.append(f.ts[start:stop])
            val_parts.append(np.asarray(f.values[start:stop], dtype=np.float64).reshape(stop - start, -1))
            where.append((f, start, stop))
        res = scorer.step(ReadingBatch(ids, np.concatenate(ts_parts), np.concatenate(val_parts)))
        k = 0
        for f, a, b in where:
            yield f, a, b, res, k
            k += b - a
        if progress is not None:
            progress(min(total, start + rows_per_step), total)


def stream_scores(
    files: Sequence[Streamable],
    scorer: StreamScorer,
    *,
    rows_per_step: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Likelihood of every row of every file, in row order (NaN where a reading was rejected)."""
    scores = {f.relpath: np.full(len(f.ts), np.nan) for f in files}
    for f, a, b, res, k in stream_steps(files, scorer, rows_per_step=rows_per_step, progress=progress):
        scores[f.relpath][a:b] = res.likelihood[k : k + b - a]
    return scores
