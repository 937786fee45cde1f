"""The ``sensorwatch`` command line."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence

import numpy as np

from sensorwatch.scoring.batch import ReadingBatch
from sensorwatch.scoring.config import CALIBRATORS, config_with


def _score_csv(args: argparse.Namespace) -> int:
    from sensorwatch.artifacts import load_default_or_builtin
    from sensorwatch.io.csvio import open_out, read_csv_chunks, result_header, result_rows
    from sensorwatch.scoring.scorer import StreamScorer

    with open(args.input, newline="") as fh:
        first = fh.readline()
        channels = max(1, len(first.strip().split(",")) - 1)
        fh.seek(0)
        model, version = load_default_or_builtin(args.model, args.models_dir, channels)
        if model.config.channels != channels:
            print(
                f"error: model {version} has {model.config.channels} channels, CSV has {channels}",
                file=sys.stderr,
            )
            return 2
        try:
            config = config_with(args.scorer, calibrator=args.calibrator)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        scorer = StreamScorer(model, config, model_version=version)
        out = open_out(args.out)
        writer = csv.writer(out)
        n = anomalies = rejected = 0
        try:
            for header, raw, ts, vals in read_csv_chunks(fh):
                if n == 0:
                    writer.writerow([*header, *result_header(header[1:])])
                res = scorer.step(ReadingBatch([args.device_id] * len(raw), ts, vals))
                for row, extra in zip(raw, result_rows(res), strict=True):
                    writer.writerow([*row, *extra])
                n += len(raw)
                anomalies += int(res.is_anomaly.sum())
                rejected += int((~res.accepted).sum())
        finally:
            if out is not sys.stdout:
                out.close()
    print(f"scored {n} readings with {version}: {anomalies} anomalies, {rejected} rejected", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from sensorwatch.report import render

    out = render(
        args.input, args.out, model_ref=args.model, models_dir=args.models_dir, calibrator=args.calibrator
    )
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sensorwatch.bench import engine

    devices = tuple(int(x) for x in args.devices.split(","))
    try:
        config = config_with(args.scorer or ())
    except ValueError as exc:
        print(f"sensorwatch bench: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    gateway = (args.gateway_devices, args.gateway_readings) if args.gateway_devices > 0 else None
    return engine.main(
        devices,
        args.json,
        args.model,
        args.trials,
        args.min_seconds,
        args.models_dir,
        config,
        gateway,
        args.device,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sensorwatch", description="Real-time sensor anomaly detection.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score-csv", help="score a CSV (timestamp + one column per channel) as one device")
    s.add_argument("input", metavar="IN.csv")
    s.add_argument("--out", help="output CSV (default: stdout)")
    s.add_argument(
        "--model",
        help="NAME or NAME/VERSION under the models directory (default: the default "
        "model when it fits the CSV's channels, else the built-in persistence fallback)",
    )
    s.add_argument("--models-dir", default=None, help="models directory (default: ./models)")
    s.add_argument("--calibrator", choices=CALIBRATORS, default="likelihood")
    s.add_argument("--device-id", default="csv")
    s.add_argument(
        "--scorer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any ScorerConfig setting, repeatable (e.g. spike_z=7, range_margin=none), as for evaluate",
    )
    s.set_defaults(func=_score_csv)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    e = bsub.add_parser(
        "engine", help="readings/s through StreamScorer.step beside the bare forecaster and a naive loop"
    )
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--devices", default="1,100,10000,100000", help="comma-separated active device counts")
    e.add_argument("--model", help="model reference or 'builtin' (default: the default univariate model)")
    e.add_argument("--models-dir", default=None, help="models directory (default: ./models)")
    e.add_argument("--trials", type=int, default=5)
    e.add_argument("--min-seconds", type=float, default=1.0, help="minimum duration of one timed trial")
    e.add_argument("--gateway-devices", type=int, default=1000, help="devices of the gateway row (0: none)")
    e.add_argument("--gateway-readings", type=int, default=50, help="readings per device per gateway step")
    e.add_argument(
        "--device",
        default="cpu",
        help="torch device of the forecaster (e.g. cuda); the scoring kernel and the state stay on the CPU",
    )
    e.add_argument(
        "--scorer", action="append", metavar="KEY=VALUE", help="override a scorer setting (repeatable)"
    )
    e.set_defaults(func=_bench)

    from sensorwatch.training.cli import add_parsers, simulate_files

    add_parsers(sub)
    m = sub.add_parser(
        "simulate", help="a simulated fleet with labelled injected anomalies: CSVs (--out) or MQTT"
    )
    target = m.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="write one CSV per device plus labels.json here")
    target.add_argument("--mqtt-url", help="publish to this broker (mqtt://host:port) instead")
    m.add_argument("--devices", type=int, default=300)
    m.add_argument("--channels", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--anomaly-rate", type=float, default=0.002, help="chance per reading that an anomaly starts"
    )
    m.add_argument("--readings", type=int, default=5000, help="--out: readings per device")
    m.add_argument("--interval", type=float, default=300.0, help="simulated seconds between readings")
    m.add_argument(
        "--profiles",
        choices=("sine", "varied"),
        default="sine",
        help="--out: 'varied' mixes daily shapes, weekends, AR/heavy-tailed noise, wandering levels and "
        "intervals of 1 min to 1 h (the training fleet of seasonal models)",
    )
    m.add_argument("--rate", type=float, default=2.0, help="--mqtt-url: readings per second per device")
    m.add_argument("--duration", type=float, default=None, help="--mqtt-url: seconds (default: until Ctrl-C)")
    m.add_argument("--labels", action="store_true", help="--mqtt-url: print injected labels as JSON lines")
    m.add_argument(
        "--time-lapse",
        type=float,
        default=1.0,
        help="--mqtt-url: simulated seconds per real second; 1 stamps readings with the wall clock",
    )
    m.add_argument(
        "--inject-after",
        type=int,
        default=400,
        help="--mqtt-url: readings per device before anomalies are injected (make run: 70, past warm-up)",
    )
    m.set_defaults(func=simulate_files)

    from sensorwatch.evaluation.cli import add_parser as add_evaluate

    add_evaluate(sub)

    r = sub.add_parser("report", help="plot readings, predictions, likelihood and anomalies of a CSV")
    r.add_argument("input", metavar="IN.csv")
    r.add_argument("--out", default="report.png", help="report.png or report.html")
    r.add_argument("--model", default=None)
    r.add_argument("--models-dir", default=None)
    r.add_argument("--calibrator", choices=CALIBRATORS, default="likelihood")
    r.set_defaults(func=_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in model cards
    np.seterr(all="ignore")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
