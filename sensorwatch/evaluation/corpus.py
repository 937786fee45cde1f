"""Multichannel corpora (``../shared/data/mv-dev`` layout) through the production scorer, scored by
that corpus' protocol (its README): event recall, point precision, F1c, event precision, false-alarm
episodes per 1,000 scored rows, median delay, attribution top-1/top-3 beside chance and beside ranking
channels by their own |z|, and SKAB's pooled point F1.

Layout: ``<corpus>/<device>.csv`` (``timestamp,<channel>...``) and ``<corpus>/labels.json`` (per device
``file``, ``train_end`` and ``windows`` with inclusive ``start``/``end`` rows and, where known, the
faulty ``channels``). Every device streams from row 0, strictly causally, all devices side by side
as devices of one batch (``rows_per_step`` rows each per step: a device's readings in one batch are
scored exactly as one by one — the scorer's batching contract); rows before ``train_end`` only warm
the state. The decision is the scorer's own ``is_anomaly``: no threshold is chosen on the labels.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sensorwatch.evaluation.stream import stream_steps
from sensorwatch.scoring.batch import KINDS
from sensorwatch.scoring.scorer import StreamScorer


@dataclass
class Device:
    name: str
    channels: list[str]
    stamps: list[str]
    ts: np.ndarray
    values: np.ndarray
    train_end: int
    windows: list[dict[str, Any]]
    # Filled by :func:`stream`:
    alarm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    likelihood: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    attribution: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def relpath(self) -> str:  # the device id it streams as (evaluation.stream)
        return self.name


def _unix(stamps: list[str]) -> np.ndarray:
    """Unix seconds of the CSV's timestamps: numbers as they are, ISO dates without an offset as UTC."""
    try:
        return np.array([float(s) for s in stamps])
    except ValueError:
        dt = np.array([s.strip().replace("Z", "").replace("T", " ") for s in stamps], dtype="datetime64[ms]")
        return dt.astype(np.int64) / 1000.0


def load(root: str | Path) -> list[Device]:
    root = Path(root)
    labels = json.loads((root / "labels.json").read_text())
    out = []
    for name, meta in sorted(labels["devices"].items()):
        with open(root / meta["file"], newline="") as fh:
            rows = list(csv.reader(fh))
        header, body = rows[0], rows[1:]
        stamps = [r[0] for r in body]
        values = np.array([[float(v) if v.strip() else math.nan for v in r[1:]] for r in body])
        out.append(
            Device(
                name,
                header[1:],
                stamps,
                _unix(stamps),
                values,
                int(meta["train_end"]),
                meta.get("windows", []),
            )
        )
    return out


def stream(devices: list[Device], scorer: StreamScorer, rows_per_step: int = 32) -> None:
    """Score every row of every device (fills the devices' result arrays)."""
    for d in devices:
        n, c = d.values.shape
        d.alarm, d.likelihood = np.zeros(n, dtype=bool), np.zeros(n)
        d.kind, d.attribution, d.z = np.zeros(n, dtype=np.int8), np.zeros((n, c)), np.zeros((n, c))
    for f, a, b, res, k in stream_steps(devices, scorer, rows_per_step=rows_per_step):
        assert isinstance(f, Device)
        part = slice(k, k + b - a)
        f.alarm[a:b] = res.is_anomaly[part]
        f.likelihood[a:b] = np.nan_to_num(res.likelihood[part])
        f.kind[a:b] = res.kind[part]
        f.attribution[a:b] = np.nan_to_num(res.attribution[part])
        f.z[a:b] = np.nan_to_num(np.abs(res.z[part]))


def _episodes(flags: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True as (first, last) indices."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(
        zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist(), strict=True)
    )


def metrics(devices: list[Device]) -> dict[str, Any]:
    """The protocol's figures over the corpus (pooled over devices)."""
    windows = detected = alarms = alarms_in = episodes = episodes_in = scored_rows = 0
    tp = fp = fn = 0
    false_kinds: dict[str, int] = {}
    delays: list[int] = []
    top1 = top3 = z_top1 = z_top3 = chance1 = chance3 = attributed = 0.0
    for d in devices:
        n = len(d.ts)
        scored = np.zeros(n, dtype=bool)
        scored[d.train_end :] = True
        scored_rows += int(scored.sum())
        alarm = d.alarm & scored
        inside = np.zeros(n, dtype=bool)
        for w in d.windows:
            inside[w["start"] : w["end"] + 1] = True
        alarms += int(alarm.sum())
        alarms_in += int((alarm & inside).sum())
        tp += int((alarm & inside & scored).sum())
        fp += int((alarm & ~inside).sum())
        fn += int((~alarm & inside & scored).sum())
        for a, b in _episodes(alarm):
            episodes += 1
            touches = bool(inside[a : b + 1].any())
            episodes_in += int(touches)
            if not touches:  # which check started the false alarm
                name = (KINDS[d.kind[a]] if d.kind.size else None) or "?"
                false_kinds[name] = false_kinds.get(name, 0) + 1
        for w in d.windows:
            lo, hi = max(w["start"], d.train_end), w["end"]
            if hi < lo:
                continue
            windows += 1
            hits = np.flatnonzero(alarm[lo : hi + 1])
            if not hits.size:
                continue
            detected += 1
            first = lo + int(hits[0])
            delays.append(first - w["start"])
            labelled = set(w.get("channels") or [])
            if labelled:
                c = len(d.channels)
                k = len(labelled & set(d.channels))
                rank = [d.channels[i] for i in np.argsort(-d.attribution[first], kind="stable")]
                zrank = [d.channels[i] for i in np.argsort(-d.z[first], kind="stable")]
                attributed += 1
                top1 += rank[0] in labelled
                top3 += bool(labelled & set(rank[:3]))
                z_top1 += zrank[0] in labelled
                z_top3 += bool(labelled & set(zrank[:3]))
                chance1 += k / c
                chance3 += 1.0 - math.comb(c - k, 3) / math.comb(c, 3)
    recall = detected / windows if windows else math.nan
    precision = alarms_in / alarms if alarms else math.nan
    f1c = 2 * precision * recall / (precision + recall) if alarms and detected else 0.0
    out: dict[str, Any] = {
        "devices": len(devices),
        "scored_rows": scored_rows,
        "windows": windows,
        "detected": detected,
        "event_recall": recall,
        "point_precision": precision,
        "f1c": f1c,
        "alarms": alarms,
        "alarm_episodes": episodes,
        "event_precision": episodes_in / episodes if episodes else math.nan,
        "false_alarm_episodes_per_1k_rows": 1000.0 * (episodes - episodes_in) / max(scored_rows, 1),
        "false_alarm_episodes_by_kind": dict(sorted(false_kinds.items())),
        "median_delay_rows": float(np.median(delays)) if delays else math.nan,
        "point_f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else math.nan,
    }
    if attributed:
        out["attribution"] = {
            "windows": int(attributed),
            "top1": top1 / attributed,
            "top3": top3 / attributed,
            "by_abs_z_top1": z_top1 / attributed,
            "by_abs_z_top3": z_top3 / attributed,
            "chance_top1": chance1 / attributed,
            "chance_top3": chance3 / attributed,
        }
    return out


def write_scores(devices: list[Device], out_dir: str | Path) -> None:
    """``DIR/<device>.csv``: timestamp, is_anomaly, likelihood, kind, attribution_<channel>..."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for d in devices:
        with open(out / f"{d.name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(
                ["timestamp", "is_anomaly", "likelihood", "kind", *(f"attribution_{c}" for c in d.channels)]
            )
            for i, stamp in enumerate(d.stamps):
                attr = [f"{v:.4f}" for v in d.attribution[i]]
                w.writerow([stamp, int(d.alarm[i]), f"{d.likelihood[i]:.9f}", KINDS[d.kind[i]] or "", *attr])
