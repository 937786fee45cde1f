"""The scoring components, in the order a reading passes through them.

Each module declares its per-device state once (``STATE``: a tuple of
:class:`~sensorwatch.scoring.state.Field`), says when it is on (``enabled(setup)``) and holds the
compiled functions the fused kernel (:mod:`sensorwatch.scoring.kernel`) calls for each reading; it
reads and writes only its own fields. Adding a check = one module here, one ``ScorerConfig`` field,
one entry in :data:`COMPONENTS` and one call in the kernel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numba
import numpy as np


def _kernel_cache_dir() -> str:
    """numba's on-disk cache, keyed by the sources of every compiled function.

    numba keys a cached function by its own file only, so a kernel compiled against an older
    component would be loaded after that component changed. Every ``.py`` file of
    ``sensorwatch/scoring`` (and the numba version) is hashed into the cache directory instead: any
    change compiles afresh. Under ``$NUMBA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME`` (``~/.cache``).
    """
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sensorwatch", "numba"
    )
    here = os.path.join(base, digest.hexdigest()[:16])
    _prune(Path(base), keep=Path(here))
    return here


#: Kernel caches of other source versions unused for this long are removed (a few MB each).
STALE_CACHE_S = 7 * 86_400


def _prune(base: Path, keep: Path) -> None:
    """Remove the cache directories of other source versions not touched for ``STALE_CACHE_S``."""
    if os.environ.get("NUMBA_CACHE_DIR") or not base.is_dir():
        return  # a directory the user chose is theirs to manage
    now = time.time()
    for old in base.iterdir():
        try:
            if old != keep and old.is_dir() and now - old.stat().st_mtime > STALE_CACHE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue  # another process pruned it first


numba.config.CACHE_DIR = _kernel_cache_dir()  # type: ignore[attr-defined]  # before any kernel is defined

# ruff: noqa: E402  (the components are imported after the cache directory is set)
from sensorwatch.model.forecaster import ForecasterConfig
from sensorwatch.scoring.components import (
    adapt,
    alert_filter,
    core,
    episode,
    forecast,
    likelihood,
    model_season,
    normaliser,
    range_check,
    seasonal_check,
    spike_check,
    stuck_check,
    threshold,
)
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.state import Layout

#: Stateful components in kernel order (the point likelihood and the decision keep no state).
COMPONENTS: tuple[ModuleType, ...] = (
    core,
    forecast,
    adapt,
    seasonal_check,
    likelihood,
    range_check,
    spike_check,
    stuck_check,
    alert_filter,
    episode,
    threshold,
    normaliser,
    model_season,
)


@dataclass(frozen=True)
class Setup:
    """What decides which components are on and their field shapes."""

    cfg: ScorerConfig
    model: ForecasterConfig


#: The record of every component's offsets the kernels read (``O.core.count``).
OFFSETS = np.dtype([(m.NAME, m.Offsets) for m in COMPONENTS])


def layout(setup: Setup) -> Layout:
    on = [(m.NAME, m.STATE) for m in COMPONENTS if m.enabled(setup)]
    return Layout(on, setup.model.channels, setup)


def offsets(lay: Layout) -> np.ndarray:
    """A one-element :data:`OFFSETS` array: every component's offsets, ``-1`` for those that are off."""
    rec = np.full(1, -1, dtype=OFFSETS)  # (fills every int64 field)
    for comp, fields in lay.offsets.items():
        for name, off in fields.items():
            rec[0][comp][name] = off
    return rec
