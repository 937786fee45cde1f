"""Scorer lifecycle used by the service: dry-run forks, model swaps, device info; the fleet simulator;
model artifacts (weights only, checksummed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sensorwatch import ReadingBatch, StreamScorer
from sensorwatch.artifacts import ArtifactError, load_model, save_model
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.simulate import Fleet
from tests.conftest import build_model, build_small_config


def _history(scorer: StreamScorer, devices: list[str], n: int, start: float = 0.0) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        scorer.step(
            ReadingBatch(devices, np.full(len(devices), start + k), rng.standard_normal((len(devices), 2)))
        )


def test_fork_scores_like_the_original_without_touching_it() -> None:
    scorer = StreamScorer(build_model("gru"), build_small_config())
    _history(scorer, ["a", "b"], 30)
    before = scorer.store.copy_rows(["a", "b"])
    batch = ReadingBatch(["a", "new"], [100.0, 100.0], [[5.0, 1.0], [1.0, 1.0]])
    forked = scorer.fork(["a", "new"]).step(batch)
    after = scorer.store.copy_rows(["a", "b"])
    for d in ("a", "b"):
        for k in before[d]:
            assert torch.equal(before[d][k], after[d][k]) or torch.allclose(
                before[d][k], after[d][k], equal_nan=True
            )
    assert "new" not in scorer.store
    real = scorer.step(batch)
    np.testing.assert_allclose(forked.likelihood, real.likelihood)
    np.testing.assert_allclose(forked.predicted, real.predicted)


def test_swap_model_keeps_state_for_same_architecture_and_resets_otherwise() -> None:
    scorer = StreamScorer(build_model("lstm", seed=1), build_small_config(), model_version="m/1")
    _history(scorer, ["a"], 20)
    assert scorer.swap_model(build_model("lstm", seed=2), "m/2") is True
    assert scorer.device_info("a")["count"] == 20
    res = scorer.step(ReadingBatch(["a"], [50.0], [[0.0, 0.0]]))
    assert res.model_version == "m/2"
    assert not res.warming_up[0]
    assert scorer.swap_model(build_model("gru", hidden=8), "other/1") is False
    assert scorer.device_info("a") is None
    res = scorer.step(ReadingBatch(["a"], [51.0], [[0.0, 0.0]]))
    assert res.model_version == "other/1"
    assert res.warming_up[0]


def test_device_info_reports_count_warmup_and_recent_likelihood() -> None:
    scorer = StreamScorer(build_model("rnn"), build_small_config(warmup=5))
    assert scorer.device_info("a") is None
    _history(scorer, ["a"], 3)
    info = scorer.device_info("a")
    assert info is not None
    assert (info["count"], info["last_ts"], info["warming_up"]) == (3, 2.0, True)
    _history(scorer, ["a"], 10, start=10)
    info = scorer.device_info("a")
    assert info["warming_up"] is False
    assert 0.0 <= info["last_likelihood"] <= 1.0


def test_fleet_is_reproducible_and_labels_injected_anomalies() -> None:
    a, b = (
        Fleet(devices=20, channels=3, seed=5, anomaly_rate=0.02),
        Fleet(devices=20, channels=3, seed=5, anomaly_rate=0.02),
    )
    labels = []
    for _ in range(600):
        ia, ta, va, la = a.step()
        ib, tb, vb, lb = b.step()
        assert ia == ib
        assert np.array_equal(ta, tb)
        assert np.array_equal(va, vb, equal_nan=True)
        assert la == lb
        labels += la
    kinds = {x for x in labels if x}
    assert kinds <= set(Fleet.KINDS)
    assert len(kinds) >= 4
    assert np.all(np.diff(ta) != 0)


def test_artifact_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    model = Forecaster(ForecasterConfig(cell="gru", hidden_size=8, channels=2))
    with torch.no_grad():
        model.head.bias.add_(0.5)
    save_model(model, tmp_path, "demo", "1")
    save_model(model, tmp_path, "demo", "2")
    loaded = load_model("demo", tmp_path)
    assert loaded.version == "2"
    assert torch.equal(loaded.model.head.bias, model.head.bias)
    weights = tmp_path / "demo" / "2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model("demo/2", tmp_path)
    card = tmp_path / "demo" / "1" / "card.json"
    doc = json.loads(card.read_text())
    doc["architecture"]["hidden_size"] = 16
    card.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="incompatible"):
        load_model("demo/1", tmp_path)
    for bad in ("../etc", "demo/../../x", "a/b/c"):
        with pytest.raises(ArtifactError):
            load_model(bad, tmp_path)


def test_building_scorers_around_a_model_another_thread_steps_is_safe() -> None:
    """A scorer built around a model already on its device (a cluster worker's new partition, a
    dry run's fork) leaves the model as it is: ``Module.to`` rebuilt an RNN's flat weight lists even
    for a no-op move, and a step of the same model in another thread failed while iterating them
    (seen in a worker; this loop hit it within 3 s before the fix)."""
    import threading
    import time

    model = build_model("lstm", hidden=32, layers=1, channels=1)
    cfg = build_small_config("likelihood")
    scorer = StreamScorer(model, cfg)
    refs = model.rnn._flat_weight_refs
    StreamScorer(model, cfg).fork(["a"])
    assert model.rnn._flat_weight_refs is refs  # untouched
    errors: list[BaseException] = []
    stop = threading.Event()

    def step() -> None:
        i = 0
        rng = np.random.default_rng(0)
        while not stop.is_set():
            ts = [1e9 + 10 * i + k for k in range(5)] + [1e9 + 10 * i + k for k in range(3)]
            try:  # two devices with several readings each: the sequence path, the module's forward
                scorer.step(ReadingBatch(["a"] * 5 + ["b"] * 3, ts, rng.random((8, 1))))
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    stepper = threading.Thread(target=step)
    stepper.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not errors:
        StreamScorer(model, cfg)
    stop.set()
    stepper.join()
    assert errors == []
