"""Hostile MQTT messages (tests/fuzz.py's strategies) through the intake's parser, the chunk
encoding that crosses the intake process's pipe, and the engine — the whole path of an MQTT message
but the sockets, at thousands of examples per second (the broker-level run is
tests/e2e/test_fuzz_mqtt.py). Each message gets exactly the outcomes its strategy says, all
refusals with a reason of the one vocabulary, and no device's state moves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sensorwatch.scoring.batch import Reading
from service.engine import Engine
from service.intake import Parser, decode_chunk, encode_chunk
from service.metrics import REJECT_REASONS, Metrics
from service.mqtt import InboundMessage
from service.settings import load_settings
from tests.fuzz import MAX_PAYLOAD, MAX_READINGS, Hostile, hostile_message
from tests.support import ADMIN_TOKEN

T0 = 1_767_225_600
DEVICES = ("d0", "d1", "d2")


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> tuple[Parser, Engine]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    s = load_settings(
        mqtt_url="",
        admin_token=ADMIN_TOKEN,
        state_dir=tmp / "state",
        model="builtin",
        max_request_readings=MAX_READINGS,
        max_payload_bytes=MAX_PAYLOAD,
    )
    engine = Engine(s, Metrics(mqtt=False))
    engine.recover()
    # Known, warm devices: a hostile reading must not move them (nor make them refuse good ones).
    warm = [Reading(d, T0 + i, [20.0 + math.sin(i / 8.0)]) for i in range(80) for d in DEVICES]
    parts = [([r.device_id for r in warm], [r.ts for r in warm], [r.values for r in warm])]
    engine.apply_parts(parts, [])
    return Parser(s), engine


def _outcomes(parser: Parser, engine: Engine, h: Hostile) -> tuple[list[str], int]:
    """The reasons of a message's refusals and how many of its readings were scored."""
    msg = InboundMessage(f"sensors/{h.device}/readings", h.payload, 1, 1, False)
    (parsed,) = decode_chunk(encode_chunk([parser(msg)]))
    if parsed.reason is not None:
        return [parsed.reason], 0
    n = len(parsed.ts)
    _, _, result = engine.apply_parts([([parsed.device] * n, parsed.ts, parsed.values)], [])
    assert result is not None
    return result.reason[~result.accepted].tolist(), int(result.accepted.sum())


@settings(
    max_examples=3_000,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(h=hostile_message)
def test_every_hostile_message_gets_its_refusals_and_moves_no_device(
    path: tuple[Parser, Engine], h: Hostile
) -> None:
    parser, engine = path
    before = {d: engine.scorer.device_info(d)["count"] for d in DEVICES}
    reasons, scored = _outcomes(parser, engine, h)
    assert scored == 0, (h.kind, h.payload[:200])
    assert len(reasons) == h.outcomes, (h.kind, reasons, h.payload[:200])
    assert set(reasons) <= set(REJECT_REASONS), reasons
    assert "internal_error" not in reasons  # a refusal of the input, never a failure of ours
    assert {d: engine.scorer.device_info(d)["count"] for d in DEVICES} == before
    # The device still takes its next good reading.
    last = engine.scorer.device_info("d0")["last_ts"]
    reasons_ok, scored_ok = _outcomes(
        parser, engine, Hostile("d0", b'{"ts": %d, "values": [20.0]}' % (last + 1), 1, "good")
    )
    assert (reasons_ok, scored_ok) == ([], 1)


@settings(max_examples=300, deadline=None)
# From 2,000 levels: orjson refuses a shorter *unclosed* run of brackets as "failed to allocate
# memory" (malformed_json) before it reaches its depth limit of 1,024 (measured, orjson 3.13).
@given(kind=st.sampled_from(["deep", "number", "objects"]), n=st.integers(2_000, 60_000))
def test_the_issue_payloads(path: tuple[Parser, Engine], kind: str, n: int) -> None:
    """The payloads that once killed paho's thread: 60,000 ``[``, objects nested 12,000 deep, numbers
    of more than 4,300 digits — refused whole, with their reason."""
    parser, engine = path
    payload = {
        "deep": b"[" * n,
        "number": b'{"ts": 1767225600, "values": [' + b"9" * min(n, 60_000) + b"]}",
        "objects": b'{"a":' * max(1_100, n // 5) + b"1" + b"}" * max(1_100, n // 5),
    }[kind]
    reasons, scored = _outcomes(parser, engine, Hostile("d0", payload, 1, kind))
    want = {"deep": "too_deep", "number": "number_out_of_range", "objects": "too_deep"}[kind]
    assert scored == 0
    assert reasons == [want] or (len(payload) > MAX_PAYLOAD and reasons == ["payload_too_large"])
