"""``sensorwatch train`` / ``sensorwatch models`` / ``sensorwatch simulate --out`` (files only)."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from sensorwatch.artifacts import list_models, load_model, save_model
from sensorwatch.model.forecaster import ForecasterConfig
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.training.data import Series, fingerprint, read_series
from sensorwatch.training.trainer import TrainConfig, Trainer, TrainResult, resolve_device


def recipe(args: argparse.Namespace, channels: list[str]) -> tuple[ForecasterConfig, TrainConfig]:
    """The architecture and training settings of ``sensorwatch train`` (and ``evaluate --train``)."""
    arch = ForecasterConfig(
        cell=args.cell,
        hidden_size=args.hidden,
        num_layers=args.layers,
        channels=len(channels),
        channel_names=tuple(channels),
        seasonal=args.seasonal,
        season_bin_s=args.season_bin,
    )
    tcfg = TrainConfig(
        epochs=args.epochs,
        bptt=args.bptt,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )
    return arch, tcfg


def reproducible(device: str) -> None:
    """Deterministic kernels and one thread, so that the same data and seed give the same weights."""
    # On CUDA some kernels have no deterministic version: warn instead of failing there (the CPU is the
    # reproducible path; a GPU run is seeded but not bit-for-bit).
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    # Float reductions depend on the thread count: one thread makes the weights (and the card's sha256)
    # the same on every run of a machine, whatever its core count. Kernels still differ between CPU
    # models, so the card records the machine the weights were built on.
    torch.set_num_threads(1)


def train_main(args: argparse.Namespace) -> int:
    try:
        resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = [p for pattern in args.data for p in _expand(pattern)]
    if not paths:
        print("error: no CSV or Parquet files matched --data", file=sys.stderr)
        return 2
    series = [read_series(p) for p in paths]
    channels = series[0].channels
    if any(s.channels != channels for s in series):
        print("error: every file must have the same channel columns", file=sys.stderr)
        return 2
    train_and_save(series, args, Path(args.out), resume=args.resume)
    return 0


def train_and_save(
    series: list[Series], args: argparse.Namespace, out: Path | None, resume: bool = False
) -> TrainResult:
    """Train on ``series`` with the recipe in ``args``; save as ``out`` = models/NAME (next version,
    or ``args.version``) with its card, unless ``out`` is None."""
    arch, tcfg = recipe(args, series[0].channels)
    reproducible(args.device)
    checkpoints = out / ".checkpoint" if out is not None else None
    trainer = Trainer(arch, ScorerConfig(), tcfg, checkpoint_dir=checkpoints)
    result = trainer.fit(series, resume=resume)
    if out is None:
        return result
    version = getattr(args, "version", None) or _next_version(out)
    card_extra = {
        "training": {
            "files": len(series),
            "readings": int(sum(len(s.ts) for s in series)),
            "data_sha256": fingerprint(series),
            "config": tcfg.__dict__,
            "history": result.history,
            "environment": build_environment(),
        },
        "validation": {"nll": result.best_val, "best_epoch": result.best_epoch},
        # The features were computed with these normalisation settings, and the model was meant to be
        # scored with these calibration defaults (the scorer's at training time).
        "scorer": _scorer_card(trainer.scorer_cfg),
        "command": "sensorwatch " + " ".join(shlex.quote(a) for a in getattr(args, "argv", [])),
    }
    path = save_model(result.model, out.parent, out.name, version, **card_extra)
    card = json.loads((path / "card.json").read_text())
    print(
        f"saved {out.name}/{version}: val_nll {result.best_val:.4f} (epoch {result.best_epoch}), "
        f"sha256 {card['sha256']}"
    )
    return result


#: ScorerConfig fields that shape the model's input features (they must match at scoring time).
NORMALISATION_FIELDS = ("norm_window", "std_floor_rel", "std_floor_abs", "dt_window", "dt_clip")


def _scorer_card(cfg: ScorerConfig) -> dict[str, dict[str, object]]:
    dump = cfg.model_dump()
    store = {"max_devices", "device_ttl_s", "state_chunk"}
    return {
        "normalisation": {k: dump[k] for k in NORMALISATION_FIELDS},
        "calibration": {k: v for k, v in dump.items() if k not in store and k not in NORMALISATION_FIELDS},
    }


def build_environment() -> dict[str, str]:
    """Where the weights were built: identical hashes are promised per CPU model, not across them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _expand(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted([*p.glob("*.csv"), *p.glob("*.parquet")])
    if any(ch in pattern for ch in "*?["):
        return sorted(Path().glob(pattern))
    return [p]


def _next_version(out: Path) -> str:
    versions = [int(p.name) for p in out.glob("*") if p.name.isdigit()]
    return str(max(versions, default=0) + 1)


def models_main(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        for m in list_models(args.models_dir):
            print(f"{m['name']}/{m['version']}  {m['path']}")
        return 0
    loaded = load_model(args.name, args.models_dir)
    print(json.dumps(loaded.card, indent=2))
    return 0


def simulate_files(args: argparse.Namespace) -> int:
    from sensorwatch.simulate import Fleet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(
        devices=args.devices,
        channels=args.channels,
        seed=args.seed,
        anomaly_rate=args.anomaly_rate,
        interval_s=args.interval,
        profiles=args.profiles,
    )
    names = [f"ch{i}" for i in range(args.channels)]
    rows: list[list[np.ndarray]] = [[] for _ in range(args.devices)]
    labels: dict[str, list[list[float | str]]] = {}
    tss: list[list[float]] = [[] for _ in range(args.devices)]
    for _ in range(args.readings):
        ids, ts, values, lab = fleet.step()
        for i in range(args.devices):
            rows[i].append(values[i])
            tss[i].append(float(ts[i]))
            if lab[i]:
                labels.setdefault(f"{ids[i]}.csv", []).append([float(ts[i]), lab[i]])
    for i, device in enumerate(fleet.ids):
        with open(out / f"{device}.csv", "w") as fh:
            fh.write("timestamp," + ",".join(names) + "\n")
            for t, v in zip(tss[i], rows[i], strict=True):
                fh.write(f"{t:.3f}," + ",".join("" if np.isnan(x) else f"{x:.6g}" for x in v) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    print(f"wrote {args.devices} CSVs of {args.readings} readings and labels.json to {out}")
    return 0


def add_recipe_arguments(t: argparse.ArgumentParser) -> None:
    """The training recipe's options (architecture, BPTT, optimiser, seed, device)."""
    t.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    t.add_argument("--hidden", type=int, default=32)
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--bptt", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--patience", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (bit-for-bit reproducible) or cuda (seeded, not bit-for-bit)",
    )
    t.add_argument(
        "--seasonal",
        action="store_true",
        help="also feed the hourly mean one day and one week before each next reading",
    )
    t.add_argument(
        "--season-bin",
        type=float,
        default=3600.0,
        help="--seasonal: seconds per bin of the seasonal memory (divides a day; 300 = exact lags for "
        "5-minute sensors, 2,017 slots per channel and device)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a forecaster with BPTT; writes models/NAME/VERSION")
    t.add_argument(
        "--data", nargs="+", required=True, help="CSV files, directories or globs (one CSV per device)"
    )
    t.add_argument("--out", required=True, help="models/NAME")
    t.add_argument("--version", help="artifact version (default: next integer)")
    add_recipe_arguments(t)
    t.add_argument("--resume", action="store_true", help="continue from models/NAME/.checkpoint")
    t.set_defaults(func=train_main)

    m = sub.add_parser("models", help="list or show model artifacts")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list")
    ml.add_argument("--models-dir", default=None)
    ms = msub.add_parser("show")
    ms.add_argument("name", help="NAME or NAME/VERSION")
    ms.add_argument("--models-dir", default=None)
    m.set_defaults(func=models_main)
