"""Per-device state of the scoring components, declared once per component and packed into a few tensors.

Each component module declares its state as a tuple of :class:`Field` (name, shape, initial value,
where it lives) and gets an offsets type (:func:`offsets_type`, a named tuple with one entry per
field) that its kernel code indexes by name: ``st[o.mean + j]``. :class:`Layout` packs the fields of
every enabled component, in registration order, into:

* ``state`` float64 (D, W): the statistics every reading reads and rewrites (gathered once per
  batch into a working copy and scattered back only when the whole batch succeeded);
* ``memory32`` float32 / ``memory64`` float64 (D, M): rings of which one slot is touched per
  reading (updated in place, each write undo-logged so a failed batch is rolled back);

plus the forecaster's hidden state (float32, owned by the scorer). A field's full name is
``component.field`` (``normaliser.mean``, ``seasonal_check.level``, …): those names are the snapshot
identity and the keys of :meth:`Layout.unpack`.

>>> from sensorwatch.scoring.state import CHANNELS, SCALAR, Field, Layout
>>> fields = (Field("count", SCALAR), Field("mean", CHANNELS, 0.5))
>>> lay = Layout([("demo", fields)], channels=2, cfg=None)
>>> lay.widths, lay.offsets["demo"]
({'state': 3, 'memory32': 0, 'memory64': 0}, {'count': 0, 'mean': 1})
>>> lay.template("state").tolist()
[0.0, 0.5, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Store = Literal["state", "memory32", "memory64"]
STORES: tuple[Store, ...] = ("state", "memory32", "memory64")
DTYPES = {"state": np.float64, "memory32": np.float32, "memory64": np.float64}
ShapeOf = Callable[[int, Any], tuple[int, ...]]


def SCALAR(channels: int, cfg: Any) -> tuple[int, ...]:
    """One value per device."""
    return ()


def CHANNELS(channels: int, cfg: Any) -> tuple[int, ...]:
    """One value per channel."""
    return (channels,)


@dataclass(frozen=True)
class Field:
    """One piece of a component's per-device state: ``shape(channels, cfg)``, initial ``init``."""

    name: str
    shape: ShapeOf
    init: float = 0.0
    store: Store = "state"


def offsets_type(fields: Sequence[Field]) -> np.dtype:
    """The record type of a component's field offsets: one int64 per field, by name (``o.mean``).

    Each component module defines it once, as ``Offsets = offsets_type(STATE)``; compiled kernels
    get one record of every component's offsets (``-1`` for a component that is off), so they see
    one type whatever the configuration (one compilation, cached on disk), and a record argument
    costs the dispatcher ~1 µs where a named tuple costs ~100 µs to type.
    """
    return np.dtype([(f.name, np.int64) for f in fields])


class Layout:
    """Where every field of every component lives (see module docstring)."""

    def __init__(self, components: Sequence[tuple[str, Sequence[Field]]], channels: int, cfg: Any):
        self.channels = channels
        self.widths: dict[str, int] = dict.fromkeys(STORES, 0)
        #: component → field → offset in its store
        self.offsets: dict[str, dict[str, int]] = {}
        #: full name → (store, offset, shape, init)
        self.fields: dict[str, tuple[Store, int, tuple[int, ...], float]] = {}
        for comp, fields in components:
            self.offsets[comp] = {}
            for f in fields:
                shape = tuple(f.shape(channels, cfg))
                off = self.widths[f.store]
                self.widths[f.store] += math.prod(shape)
                self.fields[f"{comp}.{f.name}"] = (f.store, off, shape, f.init)
                self.offsets[comp][f.name] = off

    def template(self, store: Store) -> np.ndarray:
        """A fresh device's row of ``store``."""
        row = np.zeros(self.widths[store], dtype=DTYPES[store])
        for where, off, shape, init in self.fields.values():
            if where == store:
                row[off : off + math.prod(shape)] = init
        return row

    def unpack(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Field name → value (its declared shape) from one device's row of each store."""
        out = {}
        for name, (where, off, shape, _) in self.fields.items():
            out[name] = np.asarray(rows[where][off : off + math.prod(shape)]).reshape(shape).copy()
        return out

    def describe(self) -> dict[str, list[Any]]:
        """The layout as JSON (part of the snapshot identity)."""
        return {
            name: [where, off, list(shape), init if math.isfinite(init) else str(init)]
            for name, (where, off, shape, init) in self.fields.items()
        }

    def bytes_per_device(self) -> int:
        return sum(self.widths[s] * np.dtype(DTYPES[s]).itemsize for s in STORES)
