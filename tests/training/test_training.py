"""Training: padded batches are exact, runs are reproducible, resume continues exactly, artifacts load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sensorwatch.artifacts import load_model
from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.training.data import Series, build_tensors
from sensorwatch.training.trainer import TrainConfig, Trainer, batch_loss, sequence_nll
from service.cli import main as cli


def _series(n_devices: int, lengths: list[int], seed: int = 0) -> list[Series]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_devices):
        n = lengths[i % len(lengths)]
        t = 1.7e9 + 60.0 * np.arange(n) + rng.uniform(0, 5, n)
        x = np.sin(np.arange(n) / 15 + i) + 0.1 * rng.standard_normal(n)
        out.append(Series(f"d{i}", ["ch0"], t, x[:, None]))
    return out


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_padded_batch_loss_equals_mean_of_per_sequence_losses(cell: str) -> None:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(cell=cell, hidden_size=8, num_layers=2))  # type: ignore[arg-type]
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    series = _series(4, [40, 75, 23, 60])
    cfg = ScorerConfig()
    with torch.no_grad():
        padded = batch_loss(model, build_tensors(series, cfg))
        each = [batch_loss(model, build_tensors([s], cfg)) for s in series]
    assert float(padded) == pytest.approx(float(torch.stack(each).mean()), rel=1e-5)


def test_sequence_nll_ignores_masked_cells() -> None:
    mean = torch.zeros(1, 3, 1)
    scale = torch.ones(1, 3, 1)
    target = torch.tensor([[[0.0], [100.0], [0.0]]])
    mask = torch.tensor([[[True], [False], [True]]])
    per_seq, has = sequence_nll(mean, scale, target, mask)
    assert bool(has[0])
    assert float(per_seq[0]) == pytest.approx(0.5 * np.log(2 * np.pi))


def _weights_sha(model: Forecaster) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _train(tmp: Path | None, epochs: int, resume: bool = False) -> tuple[Forecaster, Trainer]:
    arch = ForecasterConfig(cell="gru", hidden_size=8)
    tcfg = TrainConfig(epochs=epochs, bptt=32, batch_size=3, patience=10, seed=7)
    trainer = Trainer(arch, ScorerConfig(), tcfg, checkpoint_dir=tmp, progress=lambda _: None)
    trainer.fit(_series(5, [120, 90, 150], seed=1), resume=resume)
    return trainer.model, trainer


def test_training_is_reproducible_under_a_seed() -> None:
    a, _ = _train(None, 3)
    b, _ = _train(None, 3)
    assert _weights_sha(a) == _weights_sha(b)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight, _ = _train(None, 4)
    _train(tmp_path, 2)
    resumed, trainer = _train(tmp_path, 4, resume=True)
    assert trainer.result.epochs_run == 4
    assert _weights_sha(resumed) == _weights_sha(straight)


def test_train_command_writes_a_loadable_artifact(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        cli(["simulate", "--out", str(data), "--devices", "4", "--readings", "300", "--anomaly-rate", "0"])
        == 0
    )
    out = tmp_path / "models" / "tiny"
    args = ["train", "--data", str(data), "--out", str(out), "--hidden", "8", "--epochs", "2", "--bptt", "64"]
    assert cli(args) == 0
    loaded = load_model("tiny", tmp_path / "models")
    card = json.loads((out / "1" / "card.json").read_text())
    assert loaded.version == "1"
    assert card["training"]["files"] == 4
    assert card["training"]["readings"] == 1200
    assert len(card["training"]["data_sha256"]) == 64
    assert card["validation"]["nll"] == pytest.approx(min(h["val_nll"] for h in card["training"]["history"]))
    assert cli(["models", "show", "tiny", "--models-dir", str(tmp_path / "models")]) == 0
