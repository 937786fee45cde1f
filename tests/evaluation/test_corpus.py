"""``sensorwatch evaluate --corpus``: the mv-dev protocol's figures, checked on hand-made alarms, and
a whole run through the CLI on a small corpus of the same layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sensorwatch.evaluation import corpus

REPO = Path(__file__).resolve().parents[2]


def device(alarm_rows: list[int], windows: list[dict], n: int = 100, train_end: int = 20) -> corpus.Device:
    d = corpus.Device(
        name="d",
        channels=["a", "b", "c", "e"],
        stamps=[str(i) for i in range(n)],
        ts=np.arange(n, dtype=float),
        values=np.zeros((n, 4)),
        train_end=train_end,
        windows=windows,
    )
    d.alarm = np.zeros(n, dtype=bool)
    d.alarm[alarm_rows] = True
    d.attribution = np.tile([0.1, 0.2, 0.3, 0.4], (n, 1))  # ranks e, c, b, a
    d.z = np.tile([4.0, 3.0, 2.0, 1.0], (n, 1))  # ranks a, b, c, e
    return d


def test_the_protocol_figures_on_hand_made_alarms() -> None:
    windows = [
        {"start": 30, "end": 39, "channels": ["e"]},  # detected at 32 and 33 (one episode), delay 2
        {"start": 60, "end": 69, "channels": ["a", "b"]},  # missed
    ]
    # alarms: 10 (before train_end: not scored), 32-33 (in window 1), 50 and 80 (false)
    m = corpus.metrics([device([10, 32, 33, 50, 80], windows)])
    assert (m["windows"], m["detected"], m["alarms"]) == (2, 1, 4)
    assert m["event_recall"] == 0.5
    assert m["point_precision"] == 0.5
    assert m["f1c"] == pytest.approx(0.5)
    assert m["alarm_episodes"] == 3
    assert m["event_precision"] == pytest.approx(1 / 3)
    assert m["false_alarm_episodes_per_1k_rows"] == pytest.approx(1000 * 2 / 80)
    assert m["median_delay_rows"] == 2.0
    # point F1: tp 2, fp 2, fn 18 (20 window rows, 2 flagged)
    assert m["point_f1"] == pytest.approx(2 / (2 + (2 + 18) / 2))
    att = m["attribution"]
    assert (att["windows"], att["top1"], att["top3"]) == (1, 1.0, 1.0)  # e ranks first by attribution
    assert (att["by_abs_z_top1"], att["by_abs_z_top3"]) == (0.0, 0.0)  # |z| ranks a, b, c
    assert att["chance_top1"] == 0.25
    assert att["chance_top3"] == pytest.approx(0.75)


def write_corpus(root: Path) -> int:
    rng = np.random.default_rng(0)
    n, names = 600, ["p", "q", "r"]
    labels = {"devices": {}}
    for k in range(2):
        x = np.column_stack([np.sin(np.arange(n) / 10 + j) for j in range(3)]) + 0.05 * rng.standard_normal(
            (n, 3)
        )
        x[400, 1] += 5.0  # a spike on channel q inside the window
        rows = [f"{1_700_000_000 + 60 * i},{','.join(f'{v:.5f}' for v in x[i])}" for i in range(n)]
        (root / f"dev{k}.csv").write_text("timestamp," + ",".join(names) + "\n" + "\n".join(rows) + "\n")
        labels["devices"][f"dev{k}"] = {
            "file": f"dev{k}.csv",
            "n_rows": n,
            "train_end": 200,
            "windows": [{"start": 395, "end": 405, "channels": ["q"]}],
        }
    (root / "labels.json").write_text(json.dumps(labels))
    return n


def test_evaluate_corpus_end_to_end(tmp_path: Path) -> None:
    n = write_corpus(tmp_path)
    out = tmp_path / "report.json"
    scores = tmp_path / "scores"
    cmd = [
        sys.executable,
        "-m",
        "sensorwatch.cli",
        "evaluate",
        "--corpus",
        str(tmp_path),
        "--model",
        "builtin",
    ]
    proc = subprocess.run(
        [*cmd, "--json", str(out), "--scores-out", str(scores)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["windows"] == 2
    assert report["detected"] == 2
    assert report["attribution"]["top1"] == 1.0
    header, *lines = (scores / "dev0.csv").read_text().splitlines()
    assert header == "timestamp,is_anomaly,likelihood,kind,attribution_p,attribution_q,attribution_r"
    assert len(lines) == n
    # +5 on a ±1 sine: beyond the range seen, whose span (2) is ~20 noise σ: the range check's.
    assert lines[400].split(",")[1:4:2] == ["1", "out_of_range"]


def test_evaluate_corpus_trains_on_the_train_parts(tmp_path: Path) -> None:
    """``--train``: a model trained on the rows before ``train_end`` (the recipe of ``sensorwatch
    train``), saved with ``--train-out``, and the corpus evaluated with it."""
    write_corpus(tmp_path)
    out = tmp_path / "report.json"
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "sensorwatch.cli", "evaluate", "--corpus", str(tmp_path), "--train"]
    opts = ["--epochs", "2", "--hidden", "8", "--seed", "3", "--train-out", str(models / "mv")]
    proc = subprocess.run([*cmd, *opts, "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["model"] == "trained-lstm8-seed3"
    assert report["training"]["series"] == 2
    assert report["training"]["rows"] == 2 * 200
    assert report["windows"] == 2
    card = json.loads((models / "mv" / "1" / "card.json").read_text())
    assert card["training"]["readings"] == 400
    bad = subprocess.run(
        [sys.executable, "-m", "sensorwatch.cli", "evaluate", "--nab", str(tmp_path), "--train"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert "--train is for --corpus" in bad.stderr
