"""``sensorwatch report IN.csv [--out report.png|.html]`` — one picture of a device's scoring.

Top: readings, the prediction with its ±3σ band, flagged anomalies (and labelled windows when given).
Bottom: anomaly likelihood and the decision threshold. Per channel for multichannel CSVs.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.scoring.batch import ReadingBatch
from sensorwatch.scoring.config import CalibratorName, ScorerConfig
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.training.data import read_series


def render(
    csv_path: str | Path,
    out: str | Path,
    *,
    model_ref: str | None = None,
    models_dir: str | None = None,
    calibrator: CalibratorName = "likelihood",
    windows: list[tuple[float, float]] | None = None,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = read_series(csv_path)
    c = s.values.shape[1]
    model, version = load_default_or_builtin(model_ref, models_dir, c)
    scorer = StreamScorer(model, ScorerConfig(calibrator=calibrator), model_version=version)
    res = scorer.step(ReadingBatch(["report"] * len(s.ts), s.ts, s.values))
    t = (s.ts - s.ts[0]) / 3600.0
    fig, axes = plt.subplots(
        c + 1, 1, figsize=(14, 2.6 * (c + 1)), sharex=True, gridspec_kw={"height_ratios": [3] * c + [2]}
    )
    axes = np.atleast_1d(axes)
    # Predicted scale in raw units: |value − predicted| / |z| (z is recalibrated per device).
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.abs(s.values - res.predicted) / np.abs(res.z)
    for ch in range(c):
        ax = axes[ch]
        ax.plot(t, s.values[:, ch], lw=0.8, color="#1f77b4", label=f"{s.channels[ch]} reading")
        ax.plot(t, res.predicted[:, ch], lw=0.8, color="#ff7f0e", alpha=0.8, label="predicted")
        band = np.where(np.isfinite(sigma[:, ch]), 3 * sigma[:, ch], np.nan)
        ax.fill_between(
            t,
            res.predicted[:, ch] - band,
            res.predicted[:, ch] + band,
            color="#ff7f0e",
            alpha=0.15,
            lw=0,
            label="±3σ",
        )
        flagged = res.is_anomaly
        ax.scatter(t[flagged], s.values[flagged, ch], color="red", s=18, zorder=3, label="anomaly")
        _windows(ax, windows, s.ts[0])
        ax.legend(loc="upper left", fontsize=8, ncol=5)
        ax.set_ylabel(s.channels[ch])
    ax = axes[-1]
    # Surprise = −log10(1 − likelihood): 1 = one reading in ten, 4 = one in 10,000 (the default cut).
    surprise = -np.log10(np.clip(1 - res.likelihood, 1e-12, 1))
    top = max(6.0, float(np.nanmax(surprise, initial=0)) * 1.05)
    ax.plot(t, surprise, lw=0.6, color="#2ca02c", label="surprise −log10(1 − likelihood)")
    if calibrator == "likelihood":
        ax.plot(t, -np.log10(1 - res.threshold), lw=0.8, ls="--", color="black", label="threshold")
    ax.fill_between(t, 0, top, where=res.warming_up, color="grey", alpha=0.15, lw=0, label="warm-up")
    _windows(ax, windows, s.ts[0])
    ax.set_ylim(0, top)
    ax.set_xlabel("hours since first reading")
    ax.legend(loc="lower left", fontsize=8, ncol=4)
    fig.suptitle(
        f"{Path(csv_path).name} — {version}, {int(res.is_anomaly.sum())} anomalies in {len(s.ts)} readings"
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".html":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        img = base64.b64encode(buf.getvalue()).decode()
        out.write_text(
            f"<!doctype html><meta charset=utf-8><title>{Path(csv_path).name}</title>"
            f"<img alt='sensorwatch report' src='data:image/png;base64,{img}'>\n"
        )
    else:
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _windows(ax: object, windows: list[tuple[float, float]] | None, t0: float) -> None:
    for a, b in windows or []:
        ax.axvspan((a - t0) / 3600.0, (b - t0) / 3600.0, color="purple", alpha=0.1, lw=0)  # type: ignore[attr-defined]
