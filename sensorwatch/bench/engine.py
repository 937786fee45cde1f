"""``sensorwatch bench engine``: readings/s through StreamScorer.step beside its ceiling and a naive loop.

For N active devices every timed ``step`` call carries one reading of each device (batch = N).
Measured in the same run, on the same model:

* **ceiling** — the bare forecaster: the same model's cell + head (``Forecaster.step``) batched over
  the same N rows, inputs and state already in place, no validation, no state store, no
  calibration. The engine's ``ratio`` is its readings/s over this ceiling's;
* **naive** — what one writes without batching: per reading, fetch that device's state from a dict,
  one forecaster call with batch size 1, store the state back (no calibration at all);
* **naive step** — the full ``StreamScorer.step`` with one reading per call;
* **gateway** — ``--gateway-devices`` devices × ``--gateway-readings`` readings each per step (a
  gateway that forwards a burst per device), beside the 10,000-device row (or the largest run).

Each figure is the median of ``trials`` timed runs.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensorwatch.artifacts import load_default_or_builtin
from sensorwatch.model.forecaster import Forecaster
from sensorwatch.scoring.batch import ReadingBatch
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.scorer import StreamScorer

DEFAULT_DEVICES = (1, 100, 10_000, 100_000)


def _timed(work: Callable[[int], int], trials: int, min_s: float, min_calls: int) -> tuple[float, float]:
    """Median over ``trials`` of (units/s, ms per call); ``work(i)`` does call i and returns its units.

    Each trial runs until it has lasted ``min_s`` and made ``min_calls`` calls.
    """
    rates, call_ms, i = [], [], 0
    for _ in range(trials):
        calls = units = 0
        t0 = time.perf_counter()
        while True:
            units += work(i)
            i += 1
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s and calls >= min_calls:
                break
        rates.append(units / elapsed)
        call_ms.append(1e3 * elapsed / calls)
    return statistics.median(rates), statistics.median(call_ms)


def _batched(
    model: Forecaster, version: str, cfg: ScorerConfig, n: int, trials: int, min_s: float
) -> tuple[float, float]:
    cfg = cfg.model_copy(update={"max_devices": max(n, 1)})
    scorer = StreamScorer(model, cfg, model_version=version, device=_device_of(model))
    ids = [f"dev-{i:06d}" for i in range(n)]
    values = np.random.default_rng(0).standard_normal((n, model.config.channels))
    t_base = 1.7e9
    for k in range(3):  # allocate rows, get past first-reading paths
        scorer.step(ReadingBatch(ids, np.full(n, t_base + 60 * k), values))

    def work(i: int) -> int:
        scorer.step(ReadingBatch(ids, np.full(n, t_base + 60 * (i + 3)), values + 0.01 * (i % 11)))
        return n

    return _timed(work, trials, min_s, 3)


def _device_of(model: Forecaster) -> torch.device:
    return next(model.parameters()).device


def _sync(model: Forecaster) -> None:
    if _device_of(model).type == "cuda":
        torch.cuda.synchronize()


def _ceiling(model: Forecaster, n: int, trials: int, min_s: float) -> float:
    """The bare forecaster over the same ``n`` rows: readings/s of ``Forecaster.step`` alone."""
    feats = torch.randn(n, model.config.input_size, generator=torch.Generator().manual_seed(0))
    feats = feats.to(_device_of(model))
    box = [model.initial_state(n)]

    def work(i: int) -> int:
        _, _, box[0] = model.step(feats, box[0])
        _sync(model)
        return n

    with torch.inference_mode():
        return _timed(work, trials, min_s, 3)[0]


def _gateway(
    model: Forecaster, version: str, cfg: ScorerConfig, n: int, per: int, trials: int, min_s: float
) -> tuple[float, float]:
    """``n`` devices × ``per`` readings each per step (each device's burst contiguous)."""
    cfg = cfg.model_copy(update={"max_devices": max(n, 1)})
    scorer = StreamScorer(model, cfg, model_version=version, device=_device_of(model))
    ids = [f"gw-{i:06d}" for i in range(n) for _ in range(per)]
    c = model.config.channels
    values = np.random.default_rng(1).standard_normal((n * per, c))
    offsets = np.tile(np.arange(per) * 60.0, n)
    t_base = 1.7e9

    def work(i: int) -> int:
        scorer.step(ReadingBatch(ids, t_base + offsets + 60.0 * per * i, values + 0.01 * (i % 11)))
        return n * per

    work(-1)  # allocate rows, get past first-reading paths
    return _timed(work, trials, min_s, 2)


def _naive_forward(model: Forecaster, n: int, trials: int, min_s: float) -> float:
    states = {f"dev-{i:06d}": model.initial_state(1) for i in range(min(n, 10_000))}
    ids = list(states)
    dev = _device_of(model)
    inputs = [torch.full((1, model.config.input_size), float(k), device=dev) for k in range(7)]

    def work(i: int) -> int:
        d = ids[i % len(ids)]
        _, _, states[d] = model.step(inputs[i % 7], states[d])
        _sync(model)
        return 1

    with torch.inference_mode():
        return _timed(work, trials, min_s, 10)[0]


def _naive_step(
    model: Forecaster, version: str, cfg: ScorerConfig, n: int, trials: int, min_s: float
) -> float:
    cfg = cfg.model_copy(update={"max_devices": max(n, 1)})
    scorer = StreamScorer(model, cfg, model_version=version, device=_device_of(model))
    ids = [f"dev-{i:06d}" for i in range(min(n, 2_000))]
    vals = np.zeros((1, model.config.channels))

    def work(i: int) -> int:
        scorer.step(ReadingBatch([ids[i % len(ids)]], np.array([1e9 + i]), vals + i % 7))
        return 1

    return _timed(work, trials, min_s, 10)[0]


def run(
    devices: tuple[int, ...] = DEFAULT_DEVICES,
    *,
    model_ref: str | None = None,
    trials: int = 5,
    min_s: float = 1.0,
    channels: int = 1,
    models_dir: str | None = None,
    config: ScorerConfig | None = None,
    gateway: tuple[int, int] | None = (1000, 50),
    device: str = "cpu",
) -> dict[str, Any]:
    cfg = config or ScorerConfig()
    model, version = load_default_or_builtin(model_ref, models_dir, channels)
    model = model.to(device).eval()
    rows = []
    for n in devices:
        rate, step_ms = _batched(model, version, cfg, n, trials, min_s)
        ceiling = _ceiling(model, n, trials, min_s)
        naive = _naive_forward(model, n, trials, min_s / 2)
        naive_step = _naive_step(model, version, cfg, n, trials, min_s / 2)
        rows.append(
            {
                "devices": n,
                "readings_per_s": rate,
                "ceiling_readings_per_s": ceiling,
                "ratio_to_ceiling": rate / ceiling,
                "naive_readings_per_s": naive,
                "speedup": rate / naive,
                "naive_step_readings_per_s": naive_step,
                "step_ms": step_ms,
            }
        )
        print(_fmt_row(rows[-1]), flush=True)
    gw: dict[str, Any] | None = None
    if gateway is not None:
        g_dev, g_per = gateway
        rate, step_ms = _gateway(model, version, cfg, g_dev, g_per, trials, min_s)
        ref = next((r for r in rows if r["devices"] == 10_000), max(rows, key=lambda r: r["devices"]))
        gw = {
            "devices": g_dev,
            "readings_per_device": g_per,
            "readings_per_s": rate,
            "step_ms": step_ms,
            "reference_devices": ref["devices"],
            "ratio_to_reference": rate / ref["readings_per_s"],
        }
        print(
            f"gateway {g_dev:,} devices x {g_per} readings: {rate:,.0f} readings/s, {step_ms:.1f} ms/step, "
            f"{gw['ratio_to_reference']:.2f}x the {ref['devices']:,}-device rate",
            flush=True,
        )
    arch = model.config
    return {
        "model": version,
        "architecture": {
            "cell": arch.cell,
            "hidden_size": arch.hidden_size,
            "num_layers": arch.num_layers,
            "channels": arch.channels,
            "seasonal": arch.seasonal,
        },
        "scorer_overrides": cfg.model_dump(exclude_defaults=True),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "trials": trials,
        "rows": rows,
        "gateway": gw,
    }


HEADER = (
    f"{'devices':>8} {'readings/s':>12} {'ceiling r/s':>12} {'ratio':>6} {'naive fwd r/s':>14} "
    f"{'speedup':>8} {'naive step r/s':>15} {'ms/step':>9}"
)


def _fmt_row(r: dict[str, Any]) -> str:
    return (
        f"{r['devices']:>8,} {r['readings_per_s']:>12,.0f} {r['ceiling_readings_per_s']:>12,.0f} "
        f"{r['ratio_to_ceiling']:>6.2f} {r['naive_readings_per_s']:>14,.0f} "
        f"{r['speedup']:>7.0f}x {r['naive_step_readings_per_s']:>15,.0f} {r['step_ms']:>9.2f}"
    )


def main(
    devices: tuple[int, ...],
    json_out: str | None,
    model_ref: str | None,
    trials: int,
    min_s: float,
    models_dir: str | None = None,
    config: ScorerConfig | None = None,
    gateway: tuple[int, int] | None = (1000, 50),
    device: str = "cpu",
) -> int:
    print(HEADER, flush=True)
    report = run(
        devices,
        model_ref=model_ref,
        trials=trials,
        min_s=min_s,
        models_dir=models_dir,
        config=config,
        gateway=gateway,
        device=device,
    )
    text = json.dumps(report, indent=2)
    if json_out:  # written before anything else is printed: a closed stdout must not lose it
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
    a = report["architecture"]
    print(
        f"model {report['model']} ({a['cell']} h={a['hidden_size']} L={a['num_layers']} C={a['channels']}), "
        f"torch {report['torch']} threads={report['torch_threads']}, median of {trials} trials"
    )
    print(text)
    return 0
