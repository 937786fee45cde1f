"""Recurrent next-reading forecaster with a Gaussian head.

One set of weights, two entry points:

* :meth:`Forecaster.forward` — full sequences, padded to a common length, with per-sequence lengths
  (training, evaluation);
* :meth:`Forecaster.step` — one time step for a batch of devices given their state rows (streaming).

Input at each step (``2·C + 1`` features): the per-device normalised reading (C; missing channels carry
the imputed value), the missing-value mask (C; 1 = observed) and a Δt feature; a ``seasonal`` model
also gets the step since the previous reading (``C``) and the device's hourly mean one day and one
week before the next reading, relative to the current one, with masks (``4·C``) — and its recurrent
network does not see the level (the first ``C`` inputs) at all: it forecasts changes, not levels.
Output: per-channel mean and scale of the *next* normalised reading. The mean is predicted as a
residual on top of the current input (``mean = x + head(h)``), so a model whose head is zero is
exactly a last-value (persistence) forecaster — the built-in fallback — and training starts from that
sensible baseline.

>>> import torch
>>> from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
>>> model = Forecaster(ForecasterConfig(cell="gru", hidden_size=8, channels=2))
>>> feats = torch.zeros(3, 5)                     # B=3 devices, 2·C+1 features
>>> state = model.initial_state(3)
>>> mean, scale, state = model.step(feats, state)
>>> tuple(mean.shape), tuple(scale.shape), bool((scale > 0).all())
((3, 2), (3, 2), True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CellType = Literal["lstm", "gru", "rnn"]
CELLS: tuple[CellType, ...] = ("lstm", "gru", "rnn")

#: Bumped whenever the meaning of the input features changes: a state snapshot or model artifact
#: built with another feature version is refused.
FEATURE_VERSION = 1

#: Smallest predicted scale (in normalised units): keeps z-scores finite for perfectly predictable series.
MIN_SCALE = 1e-3


@dataclass(frozen=True)
class ForecasterConfig:
    """Architecture of a :class:`Forecaster` (everything needed to rebuild it, nothing else)."""

    cell: CellType = "lstm"
    hidden_size: int = 32
    num_layers: int = 1
    channels: int = 1
    channel_names: tuple[str, ...] | None = None
    #: Seasonal, level-free model: + the step since the previous reading (C) and the hourly means one
    #: day and one week before the next reading relative to the current one, with masks (4·C); the
    #: recurrent network does not see the normalised level (the head still adds its output to it).
    seasonal: bool = False
    #: Width (seconds) of the seasonal memory's time bins; must divide a day.
    season_bin_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.hidden_size < 1 or self.num_layers < 1 or self.channels < 1:
            raise ValueError("hidden_size, num_layers and channels must be >= 1")
        if self.season_bin_s <= 0 or 86_400.0 % self.season_bin_s:
            raise ValueError("season_bin_s must divide a day (e.g. 300, 900, 3600)")
        if self.channel_names is not None:
            names = tuple(self.channel_names)
            if len(names) != self.channels or len(set(names)) != len(names):
                raise ValueError("channel_names must be unique and one per channel")
            object.__setattr__(self, "channel_names", names)

    @property
    def input_size(self) -> int:
        return 2 * self.channels + 1 + (5 * self.channels if self.seasonal else 0)

    @property
    def rnn_input_size(self) -> int:
        """Features the recurrent network reads: a seasonal model skips the level (the first C)."""
        return self.input_size - (self.channels if self.seasonal else 0)

    @property
    def names(self) -> tuple[str, ...]:
        """Channel names (``ch0``, ``ch1``, … when none were given)."""
        return self.channel_names or tuple(f"ch{i}" for i in range(self.channels))

    def identity(self) -> dict[str, Any]:
        """What must match for hidden state to be meaningful across models."""
        d = asdict(self)
        d["channel_names"] = list(self.names)
        d["feature_version"] = FEATURE_VERSION
        if not self.seasonal:
            # Identities (cards, snapshots) of non-seasonal models stay as they were.
            del d["seasonal"], d["season_bin_s"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForecasterConfig:
        names = d.get("channel_names")
        return cls(
            cell=d["cell"],
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_layers"]),
            channels=int(d["channels"]),
            channel_names=tuple(names) if names else None,
            seasonal=bool(d.get("seasonal", False)),
            season_bin_s=float(d.get("season_bin_s", 3600.0)),
        )


_RNN_CLASSES: dict[str, Any] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Forecaster(nn.Module):
    """Stacked LSTM/GRU/RNN with a per-channel Gaussian head (mean, scale) for the next reading."""

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        self.config = config
        self.rnn = _RNN_CLASSES[config.cell](
            input_size=config.rnn_input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, 2 * config.channels)
        # Zero head = persistence forecast with unit scale: a sane untrained model.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[config.channels :] = _inverse_softplus(1.0 - MIN_SCALE)

    @property
    def state_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-device state tensors (name → (layers, hidden)); LSTM carries a cell state too."""
        shape = (self.config.num_layers, self.config.hidden_size)
        return {"h": shape, "c": shape} if self.config.cell == "lstm" else {"h": shape}

    def initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        """Zero state for ``batch`` devices, as ``name → (batch, layers, hidden)``."""
        p = next(self.parameters())
        return {
            k: torch.zeros(batch, *s, dtype=p.dtype, device=p.device) for k, s in self.state_shapes.items()
        }

    def _rnn_view(self, features: torch.Tensor) -> torch.Tensor:
        return features[..., self.config.channels :] if self.config.seasonal else features

    def _head(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config.channels
        raw = self.head(out)
        mean = x[..., :c] + raw[..., :c]
        scale = nn.functional.softplus(raw[..., c:]) + MIN_SCALE
        return mean, scale

    def _rnn_state(self, state: dict[str, torch.Tensor]) -> Any:
        # (B, L, H) rows → the (L, B, H) layout torch's RNNs expect.
        h = state["h"].transpose(0, 1).contiguous()
        if self.config.cell == "lstm":
            return (h, state["c"].transpose(0, 1).contiguous())
        return h

    def _state_rows(self, rnn_state: Any) -> dict[str, torch.Tensor]:
        if self.config.cell == "lstm":
            h, c = rnn_state
            return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}
        return {"h": rnn_state.transpose(0, 1)}

    def step(
        self, features: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One step for B devices.

        ``features`` (B, 2C+1) and ``state`` rows (B, L, H) → mean, scale (B, C) and the new state rows.

        Calls torch's recurrent function (``torch.lstm`` / ``torch.gru`` / ``torch.rnn_tanh``) on the
        module's own weights directly: bit-identical to ``self.rnn`` over a sequence of one (the same
        kernel, oneDNN's on CPU), without the module's per-call checks (~160 → ~85 µs for one device on
        a 2-core VM). (``torch.lstm_cell`` would be faster still but rounds differently, up to 5e-5 in z.)
        """
        x = self._rnn_view(features).unsqueeze(1)
        c = self.config
        weights = self._weights()
        if c.cell == "lstm":
            out, h, cs = torch.lstm(
                x, self._rnn_state(state), weights, True, c.num_layers, 0.0, False, False, True
            )
            new: Any = (h, cs)
        else:
            fn = torch.gru if c.cell == "gru" else torch.rnn_tanh
            out, new = fn(x, self._rnn_state(state), weights, True, c.num_layers, 0.0, False, False, True)
        mean, scale = self._head(out[:, 0], features)
        return mean, scale, self._state_rows(new)

    def _weights(self) -> list[torch.Tensor]:
        """The recurrent module's parameters in torch's flat order (per layer: w_ih, w_hh, b_ih, b_hh)."""
        rnn = self.rnn
        return [
            getattr(rnn, f"{kind}_l{k}")
            for k in range(self.config.num_layers)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]

    def forward(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Full sequences: ``features`` (B, T, 2C+1) padded, ``lengths`` (B,) → mean, scale (B, T, C), state.

        Padded steps are never fed to the recurrence (packed sequences); their outputs are zero and the
        returned state is each sequence's state after its own last valid step.
        """
        t = features.shape[1]
        rnn_state = self._rnn_state(state) if state is not None else None
        view = self._rnn_view(features)
        if lengths is None:
            out, new = self.rnn(view, rnn_state)
        else:
            packed = pack_padded_sequence(view, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out_packed, new = self.rnn(packed, rnn_state)
            out, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=t)
        mean, scale = self._head(out, features)
        if lengths is not None:
            valid = torch.arange(t, device=features.device)[None, :] < lengths.to(features.device)[:, None]
            mean = mean * valid[..., None]
            scale = torch.where(valid[..., None], scale, torch.ones_like(scale))
        return mean, scale, self._state_rows(new)


BUILTIN_VERSION = "builtin-persistence/0"


def builtin_model(channels: int = 1) -> Forecaster:
    """The documented built-in fallback: an LSTM (hidden 32, 1 layer) with a zero head, i.e. a
    last-value (persistence) forecaster with unit scale; per-device recalibration does the rest."""
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        return Forecaster(ForecasterConfig(cell="lstm", hidden_size=32, num_layers=1, channels=channels))


def _inverse_softplus(y: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(y, dtype=torch.float64))))
