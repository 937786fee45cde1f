"""Readers of the operations stack's files (Compose, Dockerfile, Mosquitto, Grafana, Prometheus rules)
and the checks the ops tests share: which SENSORWATCH_* names are real settings, which sensorwatch_*
series a query refers to and whether the service exports them."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, AliasPath

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MOSQUITTO_CONF = ROOT / "docker" / "mosquitto" / "mosquitto.conf"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sensorwatch.json"
PROMETHEUS = ROOT / "docker" / "prometheus"
RULES_GLOB = "rules/*.yml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def rule_files() -> list[Path]:
    return sorted(PROMETHEUS.glob(RULES_GLOB))


# --- settings -------------------------------------------------------------------------------------


def setting_env_names() -> frozenset[str]:
    """Every environment variable :class:`service.settings.Settings` reads (upper case): the env
    prefix + the field name, or the field's explicit validation alias(es)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, AliasPath):
            names.add(str(alias.path[0]).upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return frozenset(names)


_ENV_REF = re.compile(r"(?<![A-Za-z0-9_])SENSORWATCH_[A-Za-z0-9_]+")


def unknown_settings(names: Iterable[str]) -> list[str]:
    """The SENSORWATCH_* names among ``names`` that are no setting (case-insensitive, as
    pydantic-settings reads the environment)."""
    valid = setting_env_names()
    return sorted({n for n in names if n.upper().startswith("SENSORWATCH_") and n.upper() not in valid})


def env_refs(text: str) -> set[str]:
    """Every SENSORWATCH_* word in a text (environment keys, ${...} interpolations, ENV lines)."""
    return set(_ENV_REF.findall(text))


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution for ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?message}`` / ``${VAR?message}`` (required: ``ValueError`` when unset) and ``$$`` (with an
    empty environment by default: the values a fresh checkout gets)."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            if (op == ":?" and not env.get(name)) or name not in env:
                raise ValueError(f"required variable {name} is missing: {default}")
            return env[name]
        return env.get(name, "")

    return _INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A Compose service's ``environment`` (mapping or list form), values not interpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- Dockerfile -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str
    stage: int  # index of the FROM it belongs to


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    """The Dockerfile's instructions (comments dropped, continuation lines joined)."""
    text = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf.strip():
        logical.append(buf)
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        cmd, _, args = line.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(cmd, args.strip(), stage))
    return out


def dockerfile_env(instructions: list[Instruction], stage: int | None = None) -> dict[str, str]:
    """ENV of one stage (default: the last, i.e. the image's), in ``K=V ...`` or ``K V`` form."""
    if stage is None:
        stage = max(i.stage for i in instructions)
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.cmd != "ENV" or ins.stage != stage:
            continue
        parts = shlex.split(ins.args)
        if parts and "=" not in parts[0]:
            env[parts[0]] = " ".join(parts[1:])
        else:
            for part in parts:
                key, _, value = part.partition("=")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list, or the shell form split like a shell would."""
    args = args.strip()
    if args.startswith("["):
        parsed: list[str] = json.loads(args)
        return parsed
    return shlex.split(args)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, text: str | None = None) -> bool:
    """Whether Docker leaves ``path`` (relative, / separated) out of the build context: the last
    pattern matching the path or one of its parent directories wins; ``!`` re-includes."""
    text = DOCKERIGNORE.read_text() if text is None else text
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rx = _pattern_regex(pattern)
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# --- Mosquitto ------------------------------------------------------------------------------------


def mosquitto_options(text: str | None = None) -> list[tuple[str, str]]:
    """(option, value) of every non-comment line, in order."""
    text = MOSQUITTO_CONF.read_text() if text is None else text
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def local_mosquitto_conf(port: int, data_dir: Path) -> str:
    """The shipped mosquitto.conf with only what a local run must change: the listener on a free
    loopback port, persistence in ``data_dir`` (and ``user root`` when run as root, or Mosquitto
    drops to a user that cannot write the temp dir)."""
    text = MOSQUITTO_CONF.read_text()
    text, n_listener = re.subn(r"(?m)^listener 1883\s*$", f"listener {port} 127.0.0.1", text)
    text, n_persist = re.subn(r"(?m)^persistence_location .*$", f"persistence_location {data_dir}/", text)
    assert (n_listener, n_persist) == (1, 1), "mosquitto.conf changed shape: adapt local_mosquitto_conf"
    if os.geteuid() == 0:
        text += "\nuser root\n"
    return text


# --- series names ---------------------------------------------------------------------------------

#: A sensorwatch_* metric name used in PromQL; names that are part of a recording rule's
#: level:metric:operation name (a ':' on either side) are not exported series and are skipped.
SERIES = re.compile(r"(?<![A-Za-z0-9_:])sensorwatch_[a-z0-9_]+(?![A-Za-z0-9_:])")


def series_in(expr: str) -> set[str]:
    return set(SERIES.findall(expr))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])  # collapsed rows keep their panels inside


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_panels(dashboard.get("panels") or []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    exprs = [str(t.get("expr") or "") for p in dashboard_panels(dashboard) for t in p.get("targets") or []]
    for var in (dashboard.get("templating") or {}).get("list") or []:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        exprs += [str(query or ""), str(var.get("definition") or "")]
    return [e for e in exprs if e]


def rules_exprs(doc: dict[str, Any]) -> tuple[list[str], set[str]]:
    """(every rule's expr, the names recording rules define) of a Prometheus rules file."""
    exprs, recorded = [], set()
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            exprs.append(str(rule.get("expr") or ""))
            if rule.get("record"):
                recorded.add(str(rule["record"]))
    return exprs, recorded


def exposed_samples(exposition: str) -> set[str]:
    """Sample names of a Prometheus text exposition."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def missing_series(names: Iterable[str], exposition: str, defined: Iterable[str] = ()) -> list[str]:
    """The names that the exposition does not carry: neither as a sample name nor, for a histogram's
    base name, as its ``_bucket`` / ``_sum`` / ``_count`` samples (``defined``: recorded names)."""
    samples = exposed_samples(exposition) | set(defined)

    def exported(name: str) -> bool:
        return name in samples or all(f"{name}{s}" in samples for s in ("_bucket", "_sum", "_count"))

    return sorted(n for n in set(names) if not exported(n))
