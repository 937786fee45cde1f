"""The worker's parse process (service/cluster/parsing.py): the same parse as the MQTT intake's, and
a dead child is never a silent stall."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import orjson
import pytest

from service.cluster.parsing import ParseProcess, ParseProcessDied
from service.intake import ParsedMessage, Parser, decode_chunk, encode_chunk
from service.mqtt import InboundMessage
from service.settings import Settings

TS = 1_700_000_000.0


@pytest.fixture
def settings() -> Settings:
    return Settings(
        nats_url="nats://127.0.0.1:1", state_dir=None, max_payload_bytes=4096, max_request_readings=50
    )


def _messages() -> list[tuple[str, bytes]]:
    gateway = {"readings": [{"ts": TS + i, "values": [float(i)]} for i in range(50)]}
    return [
        ("sensors/a/readings", orjson.dumps({"ts": TS, "values": [1.5]})),
        ("sensors/b/readings", orjson.dumps(gateway)),
        ("sensors/c/readings", b"{not json"),
        ("elsewhere/c", orjson.dumps({"ts": TS, "values": [1.0]})),
        ("sensors/d/readings", b"[" * 2000),
        (
            "sensors/e/readings",
            orjson.dumps({"readings": [{"ts": TS + i, "values": [1.0]} for i in range(51)]}),
        ),
        ("sensors/f/readings", orjson.dumps({"ts": TS, "values": {"ch0": None}})),
    ]


def _same(got: ParsedMessage, want: ParsedMessage) -> None:
    for field in ParsedMessage._fields:
        g, w = getattr(got, field), getattr(want, field)
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(g, w, err_msg=field)
        else:
            assert g == w, field


def test_the_child_parses_as_the_intake_does(settings: Settings) -> None:
    messages = _messages()
    died: list[str] = []
    proc = ParseProcess(settings, on_death=died.append)
    proc.start()
    try:
        got = asyncio.run(proc.parse([t for t, _ in messages], [p for _, p in messages]))
    finally:
        proc.stop()
    parser = Parser(settings)
    # What the worker scored before the child: the intake's parse, in the pipe's chunk form.
    want = decode_chunk(encode_chunk([parser(InboundMessage(t, p, 1, 0, False)) for t, p in messages]))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        _same(g, w)
    assert [m.reason for m in got] == [
        None,
        None,
        "malformed_json",
        "bad_topic",
        "too_deep",
        "too_many_readings",
        None,
    ]
    assert proc._proc is not None
    assert proc._proc.poll() is not None  # stopped: the child exited
    assert died == []  # a stop is not a death


def test_a_dead_child_fails_the_pending_and_every_later_parse(settings: Settings) -> None:
    died: list[str] = []
    proc = ParseProcess(settings, on_death=died.append)
    proc.start()
    assert proc._proc is not None
    child = proc._proc.pid

    async def scenario() -> tuple[object, object]:
        topics, payloads = ["sensors/a/readings"], [orjson.dumps({"ts": TS, "values": [1.0]})]
        assert len(await proc.parse(topics, payloads)) == 1
        os.kill(child, signal.SIGSTOP)  # the next job stays pending in the child's pipe
        pending = asyncio.ensure_future(proc.parse(topics, payloads))
        await asyncio.sleep(0.2)
        assert not pending.done()
        os.kill(child, signal.SIGKILL)
        first = await asyncio.wait_for(asyncio.gather(pending, return_exceptions=True), 10)
        later = await asyncio.gather(proc.parse(topics, payloads), return_exceptions=True)
        return first[0], later[0]

    try:
        pending_exc, later_exc = asyncio.run(scenario())
    finally:
        proc.stop()
    assert isinstance(pending_exc, ParseProcessDied)
    assert isinstance(later_exc, ParseProcessDied)
    deadline = time.monotonic() + 5
    while not died and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(died) == 1
    assert "exited" in died[0]
    assert not proc.alive
