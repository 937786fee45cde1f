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
    assert set(card["training"]["environment"]) == {"cpu", "machine", "python", "torch"}
    assert card["validation"]["nll"] == pytest.approx(min(h["val_nll"] for h in card["training"]["history"]))
    # Normalisation behind the features and the calibration defaults are recorded.
    assert card["scorer"]["normalisation"]["norm_window"] == ScorerConfig().norm_window
    assert card["scorer"]["calibration"]["seasonal_check"] is True
    assert ScorerConfig(**card["scorer"]["normalisation"], **card["scorer"]["calibration"]) == ScorerConfig()
    # Weights are readable by the service's own user (safetensors writes owner-only files).
    assert (out / "1" / "model.safetensors").stat().st_mode & 0o444 == 0o444
    assert cli(["models", "show", "tiny", "--models-dir", str(tmp_path / "models")]) == 0


def test_parquet_and_csv_of_the_same_series_read_alike(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")  # in the dev extra, so it runs in `make test`
    import pyarrow.parquet as pq

    from sensorwatch.training.data import read_series

    ts = 1.7e9 + 60.0 * np.arange(5)
    vals = np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    stamps = np.datetime_as_string((ts * 1e6).astype("datetime64[us]"), unit="s")
    csv_path = tmp_path / "dev.csv"
    rows = ["timestamp,a,b"] + [
        f"{s},{a:g},{'' if np.isnan(b) else f'{b:g}'}" for s, (a, b) in zip(stamps, vals, strict=True)
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    from_csv = read_series(csv_path)
    for name, col in {
        "timestamp-type": pa.array((ts * 1e6).astype("datetime64[us]")),
        "unix-seconds": pa.array(ts),
        "iso-strings": pa.array([str(s) for s in stamps]),
    }.items():
        table = pa.table(
            {
                "timestamp": col,
                "a": vals[:, 0],
                "b": pa.array([None if np.isnan(b) else b for b in vals[:, 1]]),
            }
        )
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path)
        got = read_series(path)
        assert got.channels == ["a", "b"], name
        np.testing.assert_array_equal(got.ts, from_csv.ts, err_msg=name)
        np.testing.assert_array_equal(got.values, from_csv.values, err_msg=name)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"time": ts, "a": vals[:, 0]}), bad)
    with pytest.raises(ValueError, match="first column must be 'timestamp'"):
        read_series(bad)


def test_train_command_takes_parquet_files(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    data = tmp_path / "pq"
    data.mkdir()
    for i in range(3):
        n = 200
        ts = 1.7e9 + 60.0 * np.arange(n)
        pq.write_table(
            pa.table({"timestamp": ts, "ch0": np.sin(np.arange(n) / 9 + i) + 0.05 * rng.standard_normal(n)}),
            data / f"d{i}.parquet",
        )
    out = tmp_path / "models" / "pq"
    assert (
        cli(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--hidden",
                "4",
                "--epochs",
                "1",
                "--bptt",
                "64",
            ]
        )
        == 0
    )
    card = json.loads((out / "1" / "card.json").read_text())
    assert card["training"]["files"] == 3
    assert card["training"]["readings"] == 600


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--device", "cuda"]
    assert cli(args) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_varied_fleet_differs_per_device_and_leaves_the_sine_fleet_unchanged() -> None:
    from sensorwatch.simulate import SHAPES, Fleet

    sine_a = Fleet(devices=4, seed=3)
    sine_b = Fleet(devices=4, seed=3)
    varied = Fleet(devices=64, seed=3, anomaly_rate=0.0, profiles="varied")
    first = [sine_a.step()[2] for _ in range(50)]
    # The option draws after everything else: a 'sine' fleet of a seed is what it always was.
    np.testing.assert_array_equal(np.stack(first), np.stack([sine_b.step()[2] for _ in range(50)]))
    ts, vals = [], []
    for _ in range(400):
        _, t, v, _ = varied.step()
        ts.append(t)
        vals.append(v[:, 0])
    ts_a, vals_a = np.stack(ts), np.stack(vals)
    assert np.isfinite(vals_a).all()
    intervals = np.median(np.diff(ts_a, axis=0), axis=0)
    assert len({round(float(i), -1) for i in intervals}) >= 4  # 1 min … 1 h sampling
    assert set(np.unique(varied.shape)) == set(range(len(SHAPES)))
    assert varied.heavy.any()  # some devices have Student-t noise …
    assert (~varied.heavy).any()  # … and some Gaussian
    with pytest.raises(ValueError, match="profiles"):
        Fleet(devices=1, profiles="weird")


def test_a_seasonal_model_trains_loads_and_scores(tmp_path: Path) -> None:
    from sensorwatch import ReadingBatch, StreamScorer

    data = tmp_path / "data"
    sim = ["simulate", "--out", str(data), "--devices", "4", "--readings", "600", "--anomaly-rate", "0"]
    assert cli([*sim, "--profiles", "varied", "--seed", "5"]) == 0
    out = tmp_path / "models" / "sea"
    args = ["train", "--data", str(data), "--out", str(out), "--hidden", "8", "--epochs", "1", "--bptt", "64"]
    assert cli([*args, "--seasonal", "--season-bin", "1800"]) == 0
    loaded = load_model("sea", tmp_path / "models")
    assert (loaded.model.config.seasonal, loaded.model.config.season_bin_s) == (True, 1800.0)
    card = json.loads((out / "1" / "card.json").read_text())
    assert card["architecture"]["seasonal"] is True
    scorer = StreamScorer(loaded.model, model_version=loaded.ref)
    assert scorer.layout.fields["model_season.mean"][2] == (7 * 48 + 1, 1)
    res = scorer.step(ReadingBatch(["d"] * 3, 1.7e9 + 600.0 * np.arange(3), np.array([[1.0], [1.1], [0.9]])))
    assert res.accepted.all()
    assert np.isfinite(res.predicted[1:]).all()
