"""Backpropagation through time on variable-length sequences, reproducible on CPU.

* Devices are batched with padding; each batch row is one device's stream, cut into truncated-BPTT
  windows of ``bptt`` steps whose final state (detached) starts the next window — the model learns
  on long-running state, as it streams. Padded steps never enter the recurrence (packed sequences)
  and never count in the loss.
* Loss: Gaussian negative log-likelihood of the next reading (normalised units), averaged per
  sequence over its observed steps and channels, then over sequences (every device weighs the same,
  whatever its length) — :func:`sequence_nll`.
* Time-based split: the last ``val_frac`` of each device's time span validates (its state warmed up
  by the part before). Early stopping on validation loss keeps the best weights.
* Checkpoints (safetensors + JSON, never pickle) after every epoch; ``resume`` continues exactly
  (weights, optimiser moments, RNG states), so a resumed run ends with the same weights.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.training.data import Series, Tensors, build_tensors, split_time

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    bptt: int = 256
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    patience: int = 3
    val_frac: float = 0.2
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    model: Forecaster
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = math.inf
    epochs_run: int = 0


def sequence_nll(
    mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean Gaussian NLL (B,) over observed (step, channel) cells, and which sequences
    had any. ``mean``/``scale``/``target``/``mask`` are (B, T, C)."""
    z = (target - mean) / scale
    nll = 0.5 * LOG_2PI + torch.log(scale) + 0.5 * z * z
    m = mask.to(nll.dtype)
    count = m.sum((1, 2))
    per_seq = (nll * m).sum((1, 2)) / count.clamp_min(1)
    return per_seq, count > 0


def batch_loss(model: Forecaster, t: Tensors, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over sequences of their mean NLL for a padded batch (full sequences, zero initial state)."""
    feats, targets, mask, lengths = (t.features, t.targets, t.mask, t.lengths)
    if rows is not None:
        feats, targets, mask, lengths = feats[rows], targets[rows], mask[rows], lengths[rows]
    keep = lengths > 0
    mean, scale, _ = model(feats[keep], lengths[keep])
    per_seq, has = sequence_nll(mean, scale, targets[keep], mask[keep])
    return per_seq[has].mean()


class Trainer:
    def __init__(
        self,
        arch: ForecasterConfig,
        scorer_cfg: ScorerConfig,
        train_cfg: TrainConfig,
        *,
        checkpoint_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.arch, self.scorer_cfg, self.cfg = arch, scorer_cfg, train_cfg
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress or _stderr_progress
        torch.manual_seed(train_cfg.seed)
        self.device = resolve_device(train_cfg.device)
        # Weights are initialised on the CPU (same seed → same initial weights on any device).
        self.model = Forecaster(arch).to(self.device)
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        self.rng = np.random.default_rng(train_cfg.seed)
        self.result = TrainResult(self.model)
        self._best_state: dict[str, torch.Tensor] = {}
        self._bad_epochs = 0
        self._last_report = 0.0

    # ------------------------------------------------------------------ main loop
    def fit(self, series: list[Series], resume: bool = False) -> TrainResult:
        train_s, val_s = split_time(series, self.cfg.val_frac)
        train_t = build_tensors(train_s, self.scorer_cfg, self.arch.seasonal, self.arch.season_bin_s)
        val_t = build_tensors(val_s, self.scorer_cfg, self.arch.seasonal, self.arch.season_bin_s)
        cut = torch.tensor([max(len(s.ts) - 1, 0) for s in train_s])
        val_t.mask &= (torch.arange(val_t.mask.shape[1])[None, :] >= cut[:, None])[..., None]
        train_t, val_t = train_t.to(self.device), val_t.to(self.device)
        start_epoch = self._load_checkpoint() if resume else 0
        t0 = time.monotonic()
        for epoch in range(start_epoch, self.cfg.epochs):
            train_loss = self._epoch(train_t, epoch, t0, start_epoch)
            val_loss = self._validate(val_t)
            self.result.history.append({"epoch": epoch + 1, "train_nll": train_loss, "val_nll": val_loss})
            self.result.epochs_run = epoch + 1
            if val_loss < self.result.best_val - 1e-6:
                self.result.best_val, self.result.best_epoch = val_loss, epoch + 1
                self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self._bad_epochs = 0
            else:
                self._bad_epochs += 1
            self.progress(
                f"epoch {epoch + 1}/{self.cfg.epochs} train_nll {train_loss:.4f} val_nll {val_loss:.4f}"
                f"{' *' if self._bad_epochs == 0 else ''}\n"
            )
            self._save_checkpoint(epoch + 1)
            if self._bad_epochs >= self.cfg.patience:
                self.progress(f"early stop: no val improvement for {self.cfg.patience} epochs\n")
                break
        if self._best_state:
            self.model.load_state_dict(self._best_state)
        self.model.cpu().eval()  # in place (result.model is this module): artifacts take CPU weights
        return self.result

    def _epoch(self, t: Tensors, epoch: int, t0: float, start_epoch: int) -> float:
        self.model.train()
        order = self.rng.permutation(t.features.shape[0])
        batches = [order[i : i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
        total, n, steps_done = 0.0, 0, 0
        steps_total = sum(math.ceil(int(t.lengths[b].max()) / self.cfg.bptt) for b in batches) or 1
        for b in batches:
            rows = torch.from_numpy(np.sort(b))
            for loss in self._windows(t, rows, train=True):
                total += loss
                n += 1
                steps_done += 1
                self._report(epoch, steps_done / steps_total, total / n, t0, start_epoch)
        return total / max(n, 1)

    def _windows(self, t: Tensors, rows: torch.Tensor, train: bool) -> Any:
        """Stateful truncated BPTT over the batch ``rows``; yields each window's loss."""
        rows_d = rows.to(self.device)
        feats, targets, mask = t.features[rows_d], t.targets[rows_d], t.mask[rows_d]
        lengths = t.lengths[rows]  # lengths stay on the CPU (packed sequences need them there)
        state = self.model.initial_state(len(rows))
        for w in range(0, int(lengths.max()), self.cfg.bptt):
            lens = (lengths - w).clamp(0, self.cfg.bptt)
            act = lens > 0
            act_d = act.to(self.device)
            sl = slice(w, w + int(lens.max()))
            st = {k: v[act_d] for k, v in state.items()}
            mean, scale, new = self.model(feats[act_d, sl], lens[act], st)
            per_seq, has = sequence_nll(mean, scale, targets[act_d, sl], mask[act_d, sl])
            if bool(has.any()):
                loss = per_seq[has].mean()
                if train:
                    self.opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
                    self.opt.step()
                yield float(loss.detach())
            state = {k: v.detach().clone() for k, v in state.items()}
            for k in state:
                state[k][act_d] = new[k].detach()

    @torch.no_grad()
    def _validate(self, t: Tensors) -> float:
        self.model.eval()
        feats, targets, mask, lengths = t.features, t.targets, t.mask, t.lengths
        keep = lengths > 0
        keep_d = keep.to(self.device)
        mean, scale, _ = self.model(feats[keep_d], lengths[keep])
        per_seq, has = sequence_nll(mean, scale, targets[keep_d], mask[keep_d])
        return float(per_seq[has].mean()) if bool(has.any()) else math.nan

    def _report(self, epoch: int, frac: float, loss: float, t0: float, start_epoch: int) -> None:
        now = time.monotonic()
        if frac < 1.0 and now - self._last_report < 0.5:
            return  # a progress line twice a second is plenty (and keeps logs small)
        self._last_report = now
        done = (epoch - start_epoch) + frac
        left = self.cfg.epochs - start_epoch - done
        eta = (time.monotonic() - t0) / max(done, 1e-9) * left
        bar = "#" * int(20 * frac)
        self.progress(
            f"\repoch {epoch + 1}/{self.cfg.epochs} [{bar:<20}] {100 * frac:5.1f}% "
            f"loss {loss:.4f} eta {int(eta // 60)}:{int(eta % 60):02d} (max)"
        )

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_dir is None:
            return
        d = self.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in self._best_state.items()})
        opt_state = self.opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "epoch": epoch,
            "best_val": self.result.best_val,
            "best_epoch": self.result.best_epoch,
            "bad_epochs": self._bad_epochs,
            "history": self.result.history,
            "numpy_rng": self.rng.bit_generator.state,
        }
        tmp = d / "checkpoint.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
        tmp.replace(d / "checkpoint.safetensors")

    def _load_checkpoint(self) -> int:
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / "checkpoint.safetensors"
        if path is None or not path.is_file():
            return 0
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["meta"])
        tensors = load_file(str(path), device=str(self.device))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self._best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        opt_state = self.opt.state_dict()
        for i in range(len(opt_state["param_groups"][0]["params"])):
            if f"opt.{i}.step" in tensors:
                opt_state["state"][i] = {
                    k: tensors[f"opt.{i}.{k}"]
                    for k in ("step", "exp_avg", "exp_avg_sq")
                    if f"opt.{i}.{k}" in tensors
                }
        self.opt.load_state_dict(opt_state)
        torch.set_rng_state(tensors["rng.torch"].cpu())
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.result.best_val, self.result.best_epoch = meta["best_val"], meta["best_epoch"]
        self.result.history = meta["history"]
        self._bad_epochs = meta["bad_epochs"]
        self.progress(f"resumed after epoch {meta['epoch']}\n")
        return int(meta["epoch"])


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; a clear error when CUDA is asked for but not usable here.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available (this torch build or machine has no GPU); "
            "train with --device cpu (also the only bit-for-bit reproducible path)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use cpu or cuda[:N]")
    return dev


def _stderr_progress(msg: str) -> None:
    sys.stderr.write(msg)
    sys.stderr.flush()
