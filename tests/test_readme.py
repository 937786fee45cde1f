"""The README stays true: every setting and every metric the service exports is documented."""

from __future__ import annotations

import re
from pathlib import Path

from service.metrics import Metrics
from service.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [
        f"SENSORWATCH_{n.upper()}"
        for n in Settings.model_fields
        if f"`SENSORWATCH_{n.upper()}`" not in README
    ]
    assert not missing


def test_every_exported_metric_is_documented() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    documented = set(re.findall(r"`(sensorwatch_[a-z_]+)`", README))
    # prometheus_client reports a counter's family name without the _total suffix.
    missing = [n for n in names if n not in documented and n + "_total" not in documented]
    assert len(names) >= 13
    assert not missing, missing


def test_quick_start_is_exactly_two_commands() -> None:
    block = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
