"""Hypothesis strategies of hostile MQTT messages (issue #13, scope 6), shared by the parser-level
fuzz test (tests/service/test_fuzz_parser.py: fast, many examples) and the broker-level one
(tests/e2e/test_fuzz_mqtt.py: through a real Mosquitto, among good readings, across a restart).

Every message drawn is hostile *by construction*: each of its readings has at least one part no
scorer may accept (a timestamp that cannot be read or lies beyond the allowed skew, values of the
wrong type, count or size, nesting, non-finite numbers), or the message as a whole is refused (not
JSON, too deep, a number no float holds, too big, too many readings, a bad device id in its topic). So
each message has a known number of outcomes, all dead letters: 1 for a message refused whole or a
single reading, ``n`` for a well-formed gateway batch of ``n`` hostile readings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from hypothesis import strategies as st

#: The fuzz services' limits (small, so that "too many" and "too big" are cheap to reach).
MAX_READINGS = 64
MAX_PAYLOAD = 65_536
#: A timestamp the service's far-future check refuses (its default skew is 900 s).
FAR_FUTURE = (1e12, 253_402_300_799, "9999-12-31T23:59:59Z", 4_102_444_800)


@dataclass(frozen=True)
class Hostile:
    """One hostile message: where it goes (a device id, or a whole topic tail), its bytes, and how
    many dead letters it must produce."""

    device: str
    payload: bytes
    outcomes: int
    kind: str


def _dump(doc: object) -> bytes:
    # allow_nan: NaN / Infinity literals are part of the attack (json.dumps writes them by default).
    return json.dumps(doc, allow_nan=True).encode()


# -------------------------------------------------------------------------------------- parts
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
#: A timestamp that may or may not be valid (the reading is hostile by its values then).
any_ts = st.one_of(st.integers(1_600_000_000, 1_700_000_000), finite, st.text(max_size=30), st.none())
#: Timestamps that no scorer may accept.
bad_ts = st.one_of(
    st.sampled_from(FAR_FUTURE),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(alphabet="xyz!?é漢 ", min_size=1, max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.booleans(),
    st.integers(10**16, 10**300),  # beyond 2**53 seconds: far future, and no exact float
)
#: Values that no 1-channel model may accept.
bad_values = st.one_of(
    st.lists(finite, min_size=2, max_size=20),  # wrong channel count
    st.just([]),
    st.none(),
    st.lists(st.sampled_from([math.inf, -math.inf]), min_size=1, max_size=1),
    st.lists(st.floats(min_value=1.01e15, max_value=1e308), min_size=1, max_size=1),  # value_too_large
    st.text(max_size=200),
    st.lists(st.text(max_size=10), min_size=1, max_size=3),
    st.dictionaries(st.text(alphabet="qwxz", min_size=3, max_size=8), finite, min_size=1, max_size=3),
    st.booleans(),
    st.lists(st.booleans(), min_size=1, max_size=1),
    st.lists(st.lists(finite, max_size=2), min_size=1, max_size=1),
)


@st.composite
def hostile_reading(draw: st.DrawFn) -> dict[str, object]:
    """A reading (a JSON object) that must be rejected: its ts, its values, or both are bad."""
    which = draw(st.sampled_from(["ts", "values", "both", "missing_ts", "missing_values"]))
    doc: dict[str, object] = {}
    if which == "missing_ts":
        doc["values"] = draw(st.one_of(bad_values, st.just([1.0])))
    elif which == "missing_values":
        doc["ts"] = draw(any_ts)
    else:
        doc["ts"] = draw(bad_ts if which in ("ts", "both") else any_ts)
        doc["values"] = draw(bad_values if which in ("values", "both") else st.just([draw(finite)]))
    if draw(st.booleans()):  # unknown keys are ignored, not a rescue
        doc[draw(st.text(max_size=8).filter(lambda k: k not in ("ts", "values", "readings")))] = draw(
            st.integers()
        )
    return doc


# -------------------------------------------------------------------------------------- messages
@st.composite
def deep(draw: st.DrawFn) -> Hostile:
    """Nesting beyond the parser's 1,024 levels, as the whole payload or inside a reading."""
    depth = draw(st.integers(1_100, 20_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    closed = draw(st.booleans())
    inner = opener * depth + b"1" + (closer * depth if closed else b"")
    where = draw(st.sampled_from(["whole", "values", "ts"]))
    payload = inner if where == "whole" else b'{"' + where.encode() + b'": ' + inner + b"}"
    return Hostile(draw(st.sampled_from(["d0", "d1", "d2"])), payload, 1, "too_deep")


@st.composite
def huge_number(draw: st.DrawFn) -> Hostile:
    """An integer of 310–6,000 digits or a float literal beyond float range, in ts or values."""
    digits = draw(st.integers(310, 6_000))
    number = draw(st.sampled_from([b"9" * digits, b"1" + b"0" * digits, b"1e" + str(digits).encode()]))
    if draw(st.booleans()):
        number = b"-" + number
    where = draw(st.sampled_from(["ts", "values"]))
    inner = number if where == "ts" else b"[" + number + b"]"
    other = b'"values": [1.0]' if where == "ts" else b'"ts": 1767225600'
    return Hostile("d0", b'{"%s": ' % where.encode() + inner + b", " + other + b"}", 1, "huge_number")


@st.composite
def huge_string(draw: st.DrawFn) -> Hostile:
    """A long string (up to just under the payload limit) where a number belongs."""
    n = draw(st.integers(1_000, MAX_PAYLOAD - 200))
    char = draw(st.sampled_from(["x", "é", "漢", "\\u0000", "\\ud800"]))
    text = (char * (n // len(char.encode())))[: n // 2]
    where = draw(st.sampled_from(["ts", "values"]))
    doc = (
        '{"ts": "' + text + '", "values": [1.0]}'
        if where == "ts"
        else '{"ts": 1767225600, "values": "' + text + '"}'
    )
    return Hostile("d1", doc.encode(), 1, "huge_string")


@st.composite
def oversize(draw: st.DrawFn) -> Hostile:
    """A payload over max_payload_bytes (it is never parsed)."""
    n = draw(st.integers(MAX_PAYLOAD + 1, 2 * MAX_PAYLOAD))
    return Hostile("d2", b'{"ts": 1767225600, "values": [' + b"1," * (n // 2) + b"1]}", 1, "oversize")


@st.composite
def garbage(draw: st.DrawFn) -> Hostile:
    """Random bytes, invalid UTF-8, truncated or non-object JSON, JSON of the wrong shape."""
    payload = draw(
        st.one_of(
            st.binary(max_size=600),
            st.text(max_size=200).map(str.encode),
            st.sampled_from([b"", b"{", b'{"ts": 1', b"null", b"[]", b"[1, 2]", b'"x"', b"1e5", b"\xff\xfe"]),
            st.recursive(
                st.none() | st.booleans() | finite, lambda c: st.lists(c, max_size=3), max_leaves=8
            ).map(_dump),
        )
    )
    if b"readings" in payload:  # never a gateway batch by accident (its outcome count would differ)
        payload = payload.replace(b"readings", b"r")
    return Hostile(draw(st.sampled_from(["d0", "d1"])), payload, 1, "garbage")


@st.composite
def single(draw: st.DrawFn) -> Hostile:
    """One hostile reading (wrong types, NaN/Infinity literals, far-future timestamps, …)."""
    return Hostile(draw(st.sampled_from(["d0", "d1", "d2"])), _dump(draw(hostile_reading())), 1, "single")


@st.composite
def gateway(draw: st.DrawFn) -> Hostile:
    """A well-formed gateway batch of hostile readings (each one rejected: n dead letters), with
    non-object items among them (rejected in their slot)."""
    items = draw(
        st.lists(
            st.one_of(hostile_reading(), st.integers(), st.none(), st.text(max_size=5)),
            min_size=1,
            max_size=12,
        )
    )
    return Hostile(draw(st.sampled_from(["d1", "d2"])), _dump({"readings": items}), len(items), "gateway")


@st.composite
def bad_batch(draw: st.DrawFn) -> Hostile:
    """A gateway batch refused whole: over max_request_readings, empty, or not a list."""
    form = draw(st.sampled_from(["too_many", "empty", "not_list"]))
    if form == "too_many":
        n = draw(st.integers(MAX_READINGS + 1, 4 * MAX_READINGS))
        doc: object = {"readings": [{"ts": 1767225600 + i, "values": [1.0]} for i in range(n)]}
    elif form == "empty":
        doc = {"readings": []}
    else:
        doc = {
            "readings": draw(
                st.one_of(
                    st.integers(),
                    st.text(max_size=5),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                )
            )
        }
    return Hostile("d0", _dump(doc), 1, "bad_batch")


#: Device ids that must be refused (bad_device_id): non-ASCII, overlong, empty-ish, odd characters.
#: Never "/", "+", "#" or NUL: those change or break the topic itself.
bad_device = st.one_of(
    st.text(alphabet="éüß漢字🙂Ωж", min_size=1, max_size=20),
    st.integers(129, 2_000).map(lambda n: "a" * n),
    st.text(alphabet=" !\"$%&'()*,;<=>?@[\\]^`{|}~", min_size=1, max_size=10),
    st.just(" "),
)


@st.composite
def bad_topic(draw: st.DrawFn) -> Hostile:
    """A valid reading on the topic of a device id that must be refused."""
    return Hostile(draw(bad_device), b'{"ts": 1767225600, "values": [1.0]}', 1, "bad_device_id")


hostile_message = st.one_of(
    deep(), huge_number(), huge_string(), oversize(), garbage(), single(), gateway(), bad_batch(), bad_topic()
)
