"""Training data: one CSV or Parquet file per device (``timestamp`` + one column per channel) → padded
tensors.

Features are built with :func:`sensorwatch.scoring.features.featurize_sequence` — the same per-device
normalisation, missing mask and Δt feature as streaming. The target of step t is reading t+1 in the
normaliser units of step t, exactly what the streaming scorer compares its prediction with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sensorwatch.io.csvio import parse_csv_ts, read_csv_chunks
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.features import featurize_sequence


@dataclass
class Series:
    name: str
    channels: list[str]
    ts: np.ndarray  # (T,)
    values: np.ndarray  # (T, C), NaN = missing


def read_series(path: str | Path) -> Series:
    """One device's CSV or Parquet file; rows with an unparseable timestamp or out of order are dropped."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _clean(path, *_read_parquet(path))
    ts_parts, val_parts = [], []
    header: list[str] | None = None
    with open(path, newline="") as fh:
        for chunk_header, _, ts, vals in read_csv_chunks(fh):
            header = chunk_header
            ts_parts.append(ts)
            val_parts.append(vals)
    if header is None:
        raise ValueError(f"{path}: no rows")
    return _clean(path, header, np.concatenate(ts_parts), np.concatenate(val_parts))


def _clean(path: Path, header: list[str], ts: np.ndarray, values: np.ndarray) -> Series:
    values = np.array(values, dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    keep = np.isfinite(ts)
    keep[1:] &= np.diff(ts) > 0  # strictly increasing, as the streaming scorer requires
    return Series(path.stem, header[1:], ts[keep], values[keep])


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``timestamp`` (a timestamp type, Unix seconds, or ISO-8601 strings) + numeric channel columns."""
    try:
        import pyarrow.parquet as pq  # optional: pip install 'sensorwatch[parquet]'
    except ImportError:
        raise ValueError(
            f"{path}: Parquet input needs pyarrow (pip install 'sensorwatch[parquet]')"
        ) from None
    table = pq.read_table(path)
    names = [str(n) for n in table.column_names]
    if not names or names[0].strip().lower() != "timestamp" or len(names) < 2:
        raise ValueError(f"{path}: the first column must be 'timestamp', then one column per channel")
    col = table.column(0)
    kind = str(col.type)
    if kind.startswith("timestamp") or kind.startswith("date"):
        import pyarrow as pa

        # Naive timestamps are UTC (as in CSVs); nulls become NaN (unparseable → dropped).
        us = col.cast(pa.timestamp("us")).cast(pa.int64()).cast(pa.float64())
        ts = us.to_numpy(zero_copy_only=False) / 1e6
    elif kind in ("string", "large_string"):
        ts = np.array([parse_csv_ts(v) if v is not None else np.nan for v in col.to_pylist()])
    else:
        ts = col.cast("double").to_numpy(zero_copy_only=False)
    try:
        values = np.stack(
            [table.column(i).cast("double").to_numpy(zero_copy_only=False) for i in range(1, len(names))], 1
        )
    except Exception as exc:  # pyarrow raises several types for a non-numeric column
        raise ValueError(f"{path}: channel columns must be numeric ({exc})") from None
    return names, np.asarray(ts, dtype=np.float64), values


def fingerprint(series: list[Series]) -> str:
    """sha256 over every series' name, timestamps and values (the training data's identity)."""
    h = hashlib.sha256()
    for s in series:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.ts).tobytes())
        h.update(np.ascontiguousarray(np.nan_to_num(s.values, nan=-1e308)).tobytes())
    return h.hexdigest()


#: Steps at the start of each series left out of the loss (normaliser still settling).
SKIP_FIRST = 16


@dataclass
class Tensors:
    """Padded per-device tensors: features (B, T, 2C+1), targets (B, T, C), target mask (B, T, C),
    lengths (B,). Step t predicts reading t+1, so a series of n readings has n−1 training steps."""

    features: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> Tensors:
        """Features, targets and mask on ``device``; lengths stay on the CPU (packing needs them there)."""
        return Tensors(self.features.to(device), self.targets.to(device), self.mask.to(device), self.lengths)


def build_tensors(
    series: list[Series], cfg: ScorerConfig, seasonal: bool = False, season_bin_s: float = 3600.0
) -> Tensors:
    c = series[0].values.shape[1]
    t_max = max(len(s.ts) for s in series)
    b = len(series)
    values = torch.full((b, t_max, c), float("nan"), dtype=torch.float64)
    ts = torch.zeros((b, t_max), dtype=torch.float64)
    lengths = torch.tensor([len(s.ts) for s in series])
    for i, s in enumerate(series):
        n = len(s.ts)
        values[i, :n] = torch.from_numpy(s.values)
        ts[i, :n] = torch.from_numpy(s.ts)
        if n < t_max:  # padding continues the clock so Δt stays finite; masked out anyway
            ts[i, n:] = torch.from_numpy(s.ts[-1] + np.arange(1.0, t_max - n + 1))
    feats, centre, scale = featurize_sequence(values, ts, cfg, seasonal, season_bin_s)
    nxt = values[:, 1:]
    targets = ((nxt - centre[:, :-1]) / scale[:, :-1]).to(torch.float32)
    pos = torch.arange(t_max - 1)[None, :]
    # The first readings are normalised by a few samples only (the scorer is in warm-up there too).
    steps = (pos < (lengths - 1)[:, None]) & (pos >= SKIP_FIRST)
    mask = torch.isfinite(targets) & steps[..., None]
    targets = torch.nan_to_num(targets, nan=0.0)
    return Tensors(feats[:, :-1].contiguous(), targets, mask, (lengths - 1).clamp_min(0))


def split_time(series: list[Series], val_frac: float) -> tuple[list[Series], list[Series]]:
    """Per device, the first (1 − val_frac) of its time span trains, the rest validates."""
    train, val = [], []
    for s in series:
        cut = s.ts[0] + (1 - val_frac) * (s.ts[-1] - s.ts[0])
        k = int(np.searchsorted(s.ts, cut, side="right"))
        train.append(Series(s.name, s.channels, s.ts[:k], s.values[:k]))
        val.append(Series(s.name, s.channels, s.ts, s.values))  # whole series; loss only after the cut
    return train, val
