"""``sensorwatch evaluate --nab DIR | --corpus DIR [--model NAME] [--json OUT] [--scores-out DIR]``.

Streams every file of a NAB-format corpus through the production StreamScorer (one device per file,
causal, files side by side in one batch), then scores the likelihoods with the NAB rules (all three
profiles, one threshold each for the whole corpus) plus event-wise precision/recall/F1 and delay.
A reading the scorer rejects (e.g. a repeated timestamp in the data) gets anomaly score 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.evaluation import corpus
from sensorwatch.evaluation.nab import PROFILES, event_metrics, load_corpus, score_all_profiles
from sensorwatch.evaluation.stream import stream_scores
from sensorwatch.scoring.config import ScorerConfig, config_with
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.training.cli import add_recipe_arguments, train_and_save
from sensorwatch.training.data import Series


def evaluate(
    root: str | Path,
    model_ref: str | None = None,
    models_dir: str | None = None,
    config: ScorerConfig | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[Any]]:
    files = load_corpus(root)
    model, version = load_default_or_builtin(model_ref, models_dir, channels=1)
    scorer = StreamScorer(model, config or ScorerConfig(), model_version=version)
    t0 = time.monotonic()
    bar = _FileBar(sorted(f.n for f in files)) if progress else None
    scores = stream_scores(files, scorer, progress=bar)
    elapsed = time.monotonic() - t0
    scores = {k: np.nan_to_num(v, nan=0.0) for k, v in scores.items()}
    results = score_all_profiles(files, scores)
    std = results["standard"]
    report = {
        "model": version,
        "files": len(files),
        "rows": int(sum(f.n for f in files)),
        "seconds": round(elapsed, 2),
        "nab": {p: round(r.normalized, 3) for p, r in results.items()},
        "thresholds": {p: r.threshold for p, r in results.items()},
        "windows": {"found": std.tp, "missed": std.fn, "false_positive_rows": std.fp},
        "events": event_metrics(files, scores, std.threshold),
        "per_file_standard": {k: round(v, 3) for k, v in std.per_file.items()},
    }
    return report, scores, files


class _FileBar:
    """Progress over files (files stream side by side, so a file is done when its last row is),
    with rows/s and an ETA, on stderr."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.total_rows = sum(lengths)
        self.t0 = time.monotonic()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        files_done = int(np.searchsorted(self.lengths, done, side="right"))
        if files_done == self.shown and done % 1000 and done != total:
            return
        self.shown = files_done
        n = len(self.lengths)
        rows = sum(min(length, done) for length in self.lengths)
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        left = self.total_rows - rows
        eta = left / max(rows / elapsed, 1e-9)
        frac = files_done / max(n, 1)
        sys.stderr.write(
            f"\rfiles [{'#' * int(30 * frac):<30}] {files_done}/{n}  "
            f"{rows / elapsed:,.0f} rows/s  ETA {eta:4.0f} s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def evaluate_corpus(
    root: str | Path,
    model_ref: str | None = None,
    models_dir: str | None = None,
    config: ScorerConfig | None = None,
    train: argparse.Namespace | None = None,
) -> tuple[dict[str, Any], list[corpus.Device]]:
    """A multichannel corpus (``mv-dev`` layout) through the scorer, and its protocol's figures.
    ``train``: first train a model on the devices' train parts with that recipe (``sensorwatch
    train``'s options) and evaluate with it."""
    devices = corpus.load(root)
    channels = len(devices[0].channels)
    trained: dict[str, Any] = {}
    if train is not None:
        model, version, trained = _train_on(devices, train)
    else:
        model, version = load_default_or_builtin(model_ref, models_dir, channels=channels)
    if model.config.channels != channels:
        raise ValueError(f"model {version} has {model.config.channels} channels, the corpus {channels}")
    scorer = StreamScorer(model, config or ScorerConfig(), model_version=version)
    t0 = time.monotonic()
    corpus.stream(devices, scorer)
    report = {"model": version, "seconds": round(time.monotonic() - t0, 2), **trained}
    report.update(corpus.metrics(devices))
    return report, devices


def _train_on(devices: list[corpus.Device], args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    """Train on every device's rows before ``train_end`` (the normal history the protocol allows)."""
    series = [
        Series(d.name, d.channels, d.ts[: d.train_end], d.values[: d.train_end])
        for d in devices
        if d.train_end >= 2
    ]
    out = Path(args.train_out) if args.train_out else None
    t0 = time.monotonic()
    result = train_and_save(series, args, out)
    info = {
        "training": {
            "series": len(series),
            "rows": int(sum(len(s.ts) for s in series)),
            "cell": args.cell,
            "hidden": args.hidden,
            "seed": args.seed,
            "best_epoch": result.best_epoch,
            "val_nll": result.best_val,
            "seconds": round(time.monotonic() - t0, 1),
        }
    }
    return result.model, f"trained-{args.cell}{args.hidden}-seed{args.seed}", info


def _corpus_main(args: argparse.Namespace, config: ScorerConfig) -> int:
    try:
        report, devices = evaluate_corpus(
            args.corpus, args.model, args.models_dir, config, train=args if args.train else None
        )
    except (ValueError, OSError, KeyError) as exc:
        print(f"sensorwatch evaluate: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(
        f"{args.corpus}: {report['devices']} devices, {report['scored_rows']:,} scored rows, "
        f"{report['windows']} windows, model {report['model']} ({report['seconds']} s streaming)"
    )
    for key in (
        "event_recall",
        "point_precision",
        "f1c",
        "event_precision",
        "false_alarm_episodes_per_1k_rows",
        "median_delay_rows",
        "point_f1",
    ):
        print(f"  {key:<34}{report[key]:>8.3f}")
    kinds = ", ".join(f"{k} {n}" for k, n in report["false_alarm_episodes_by_kind"].items())
    print(f"  false-alarm episodes by the check that started them: {kinds or 'none'}")
    att = report.get("attribution")
    if att:
        print(
            f"  attribution over {att['windows']} detected windows: top-1 {att['top1']:.2f} / top-3 "
            f"{att['top3']:.2f}; by |z| {att['by_abs_z_top1']:.2f} / {att['by_abs_z_top3']:.2f}; chance "
            f"{att['chance_top1']:.2f} / {att['chance_top3']:.2f}"
        )
    _write_json(args.json, report)
    if args.scores_out:
        corpus.write_scores(devices, args.scores_out)
    return 0


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=float) + "\n")


def evaluate_main(args: argparse.Namespace) -> int:
    try:
        config = config_with(args.scorer or (), calibrator=args.calibrator)
    except ValueError as exc:
        print(f"sensorwatch evaluate: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if args.corpus:
        return _corpus_main(args, config)
    if args.train:
        print("sensorwatch evaluate: --train is for --corpus", file=sys.stderr)
        return 2
    report, scores, files = evaluate(args.nab, args.model, args.models_dir, config)
    nab = report["nab"]
    print(
        f"NAB on {report['files']} files, {report['rows']} rows, model {report['model']} "
        f"({report['seconds']} s streaming)"
    )
    print(f"{'profile':<22}{'score':>8}  threshold")
    for p in PROFILES:
        print(f"{p:<22}{nab[p]:>8.2f}  {report['thresholds'][p]:.6f}")
    ev = report["events"]
    print(
        f"events (standard threshold): precision {ev['precision']:.3f} recall {ev['recall']:.3f} "
        f"F1 {ev['f1']:.3f} mean delay {ev['mean_delay_rows']:.1f} rows"
    )
    _write_json(args.json, report)
    if args.scores_out:
        for f in files:
            out = Path(args.scores_out) / f.relpath
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w") as fh:
                fh.write("timestamp,value,anomaly_score\n")
                for stamp, v, s in zip(f.timestamps, f.values, scores[f.relpath], strict=True):
                    fh.write(f"{stamp},{v:g},{s:.9f}\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="NAB score, or a multichannel corpus' protocol, of a model through the streaming scorer",
    )
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--nab", help="NAB corpus root with data/<category>/*.csv and labels/")
    source.add_argument(
        "--corpus", help="multichannel corpus: <device>.csv files and labels.json (the mv-dev layout)"
    )
    e.add_argument("--model", default=None)
    e.add_argument(
        "--train",
        action="store_true",
        help="--corpus: first train a model on the devices' rows before train_end (the recipe of "
        "sensorwatch train: --cell, --hidden, --epochs, --seed, ...) and evaluate with it",
    )
    e.add_argument("--train-out", help="--train: also save the model as this models/NAME")
    e.add_argument("--models-dir", default=None)
    e.add_argument("--calibrator", choices=("likelihood", "threshold"), default="likelihood")
    e.add_argument(
        "--scorer",
        action="append",
        metavar="KEY=VALUE",
        help="override a scorer setting (repeatable), e.g. --scorer seasonal_check=false",
    )
    e.add_argument("--json", help="write the report as JSON")
    e.add_argument(
        "--scores-out",
        help="write score CSVs under this directory (NAB: timestamp,value,anomaly_score; --corpus: "
        "timestamp,is_anomaly,likelihood,kind,attribution_<channel>...)",
    )
    add_recipe_arguments(e)
    e.set_defaults(func=evaluate_main)
