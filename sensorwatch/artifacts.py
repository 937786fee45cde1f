"""Model artifacts: ``models/<name>/<version>/model.safetensors`` + ``card.json``.

Weights are loaded as tensors only (safetensors, never pickle), from inside the models directory, and
checked against the card's sha256 and architecture before use: a tampered, truncated or incompatible
artifact is an :class:`ArtifactError`, never executed code.

>>> import tempfile
>>> from sensorwatch.artifacts import load_model, save_model
>>> from sensorwatch.model.forecaster import Forecaster, ForecasterConfig
>>> d = tempfile.mkdtemp()
>>> _ = save_model(Forecaster(ForecasterConfig(hidden_size=4)), d, "demo", "1")
>>> loaded = load_model("demo", d)
>>> loaded.name, loaded.version, loaded.model.config.hidden_size
('demo', '1', 4)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from sensorwatch.model.forecaster import (
    BUILTIN_VERSION,
    FEATURE_VERSION,
    Forecaster,
    ForecasterConfig,
    builtin_model,
)

CARD_SCHEMA = "sensorwatch-model/1"
DEFAULT_MODEL = "univariate"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(ValueError):
    """A model artifact is missing, malformed, tampered with or incompatible."""


class ModelNotFound(ArtifactError):
    """No artifact of that name (or version) in the models directory (REST: 404, not 422)."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    model: Forecaster
    card: dict[str, Any]
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def default_models_dir() -> Path:
    """``$SENSORWATCH_MODELS_DIR``, else ``models/`` in the working directory, else the repository's."""
    env = os.environ.get("SENSORWATCH_MODELS_DIR")
    if env:
        return Path(env)
    cwd = Path.cwd() / "models"
    return cwd if cwd.is_dir() else Path(__file__).resolve().parent.parent / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(
    model: Forecaster, models_dir: str | os.PathLike[str], name: str, version: str, **card_extra: Any
) -> Path:
    """Write ``model`` as a versioned artifact; returns its directory."""
    _check_name(name)
    _check_name(version)
    out = Path(models_dir) / name / version
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    # safetensors writes owner-only files; an artifact is read by the service's own (other) user.
    weights.chmod(0o644)
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "version": version,
        "architecture": model.config.identity(),
        "sha256": sha256_file(weights),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **card_extra,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


def resolve(ref: str, models_dir: str | os.PathLike[str]) -> Path:
    """``name`` (latest version) or ``name/version`` → the artifact directory inside ``models_dir``."""
    parts = ref.strip("/").split("/")
    if len(parts) not in (1, 2):
        raise ArtifactError(f"model reference must be NAME or NAME/VERSION, got {ref!r}")
    for p in parts:
        _check_name(p)
    root = Path(models_dir).resolve()
    base = root / parts[0]
    if len(parts) == 2:
        path = base / parts[1]
    else:
        versions = (
            sorted(
                (p for p in base.glob("*") if (p / "card.json").is_file()), key=lambda p: _version_key(p.name)
            )
            if base.is_dir()
            else []
        )
        if not versions:
            raise ModelNotFound(f"no model named {parts[0]!r} in {root}")
        path = versions[-1]
    if not _inside(root, path) or not (path / "card.json").is_file():
        raise ModelNotFound(f"no model {ref!r} in {root}")
    for name in ("card.json", "model.safetensors"):  # a file linked out of the directory is refused
        f = path / name
        if (f.exists() or f.is_symlink()) and not _inside(root, f):
            raise ArtifactError(f"{ref}: {name} resolves outside the models directory {root}")
    return path


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``, every symlink followed, is inside ``root``; a loop or an unreadable link is
    not (resolving it raises, which would otherwise surface as a server error)."""
    try:
        return root in path.resolve(strict=path.is_symlink()).parents
    except (OSError, RuntimeError):
        return False


def load_model(ref: str, models_dir: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load and verify an artifact (schema, sha256, architecture) — weights only."""
    path = resolve(ref, models_dir if models_dir is not None else default_models_dir())
    try:
        card = json.loads((path / "card.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}/card.json is not valid JSON: {exc}") from exc
    if not isinstance(card, dict) or card.get("schema") != CARD_SCHEMA:
        raise ArtifactError(f"{path}/card.json: unknown schema (want {CARD_SCHEMA})")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{path}: model.safetensors missing")
    digest = sha256_file(weights)
    if digest != card.get("sha256"):
        raise ArtifactError(f"{path}: sha256 mismatch (card {card.get('sha256')}, file {digest})")
    try:
        arch = card["architecture"]
        if arch.get("feature_version") != FEATURE_VERSION:
            raise ArtifactError(f"{path}: feature version {arch.get('feature_version')} != {FEATURE_VERSION}")
        model = Forecaster(ForecasterConfig.from_dict(arch))
        model.load_state_dict(load_file(str(weights)), strict=True)
    except ArtifactError:
        raise
    except Exception as exc:  # shape mismatches, missing keys, bad headers
        raise ArtifactError(f"{path}: incompatible or corrupt weights ({exc})") from exc
    model.eval()
    return LoadedModel(str(card["name"]), str(card["version"]), model, card, digest)


def list_models(models_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    root = Path(models_dir if models_dir is not None else default_models_dir())
    out = []
    for card_path in sorted(root.glob("*/*/card.json")):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append({"name": card.get("name"), "version": card.get("version"), "path": str(card_path.parent)})
    return out


def _check_name(s: str) -> None:
    if not _NAME.match(s):
        raise ArtifactError(f"invalid model name or version {s!r} (letters, digits, . _ -)")


def _version_key(v: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.-]", v))


#: Model name that selects the built-in persistence fallback (not an artifact).
BUILTIN_NAME = "builtin"


def load_default_or_builtin(
    ref: str | None, models_dir: str | os.PathLike[str] | None, channels: int
) -> tuple[Forecaster, str]:
    """The named model; else the default model when it exists and fits ``channels``; else the built-in
    persistence fallback (an LSTM with a zero head, hidden 32), which ``ref="builtin"`` also selects.
    Returns (model, version string)."""
    if ref == BUILTIN_NAME:
        return builtin_model(channels), BUILTIN_VERSION
    if ref:
        loaded = load_model(ref, models_dir)
        return loaded.model, loaded.ref
    try:
        loaded = load_model(DEFAULT_MODEL, models_dir)
        if loaded.model.config.channels == channels:
            return loaded.model, loaded.ref
    except ArtifactError:
        pass
    return builtin_model(channels), BUILTIN_VERSION
