"""Readings as clean arrays (the MQTT intake's fast path) build exactly the batch the per-reading path
builds from the same parsed JSON — same timestamps, values, NaN patterns and rejection reasons — for
any mix of parts, widths and hostile values; and they survive the intake's pipe format unchanged."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sensorwatch.scoring.batch import ReadingBatch, clean_columns
from service.intake import ParsedMessage, decode_chunk, encode_chunk
from tests.engine.helpers import SUPPRESSED

CHANNELS = ("a", "b")

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.sampled_from([0, 2**53 - 1, 2**53, -(2**53), 2**53 + 1, 10**308, 2 * 10**308, 10**400, 1.7e308]),
)
value = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=3))
reading_ts = st.one_of(numbers, st.booleans(), st.none(), st.just("2026-01-01T00:00:00Z"), st.just("x"))
row = st.one_of(
    st.lists(numbers, min_size=2, max_size=2),  # the common shape: clean unless a number is not
    st.lists(value, min_size=0, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), value, max_size=3),
    value,
)
mixed = st.lists(st.tuples(reading_ts, row), min_size=1, max_size=6)
plain = st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e12, 1e12), numbers)
common = st.integers(1, 3).flatmap(  # one width per message (2 is the model's): mostly clean
    lambda k: st.lists(st.tuples(plain, st.lists(plain, min_size=k, max_size=k)), min_size=1, max_size=6)
)
message = st.one_of(mixed, common)


def part_of(device: str, readings: list[tuple[Any, Any]]) -> tuple[list[str], Any, Any]:
    """A message's part the way the intake makes it: arrays when clean, the parsed lists if not."""
    ts, values = [t for t, _ in readings], [v for _, v in readings]
    clean = clean_columns(ts, values)
    if clean is None:
        return [device] * len(ts), ts, values
    cts, flat, width = clean
    arr = np.array(flat, dtype=np.float64).reshape(len(cts), width)
    return [device] * len(ts), np.array(cts, dtype=np.float64), arr


def assert_same(got: ReadingBatch, want: ReadingBatch) -> None:
    assert got.device_ids == want.device_ids
    np.testing.assert_array_equal(got.ts, want.ts)  # NaN where NaN, bit-for-bit otherwise
    np.testing.assert_array_equal(got.values, want.values)
    assert got.reject.tolist() == want.reject.tolist()


@settings(max_examples=400, deadline=None, suppress_health_check=SUPPRESSED)
@given(st.lists(message, min_size=0, max_size=5))
def test_parts_build_the_batch_the_per_reading_path_builds(messages: list[list[tuple[Any, Any]]]) -> None:
    parts = [part_of(f"d{i}", m) for i, m in enumerate(messages)]
    ids = [d for p in parts for d in p[0]]
    ts = [t for m in messages for t, _ in m]
    values = [v for m in messages for _, v in m]
    want = ReadingBatch.from_columns(ids, ts, values, CHANNELS)
    assert_same(ReadingBatch.from_parts(parts, CHANNELS), want)


def test_clean_columns_takes_the_common_shape_and_leaves_the_rest() -> None:
    assert clean_columns([1767225600, 1767225660.5], [[1.0, 2], [math.nan, 4.0]]) is not None
    for ts, values in [
        ([2**53], [[1.0, 2.0]]),  # not exact as a float: the per-reading path decides
        ([math.nan], [[1.0, 2.0]]),
        ([math.inf], [[1.0, 2.0]]),
        ([1, 2], [[1.0, 2.0], [1.0]]),  # widths differ
        ([1], [[10**309, 1.0]]),  # beyond float range: value_too_large there
        ([1], [[None, 1.0]]),
        ([1], [[True, 1.0]]),
        ([True], [[1.0, 2.0]]),
        (["1"], [[1.0, 2.0]]),
        ([1], [{"a": 1.0}]),
    ]:
        assert clean_columns(ts, values) is None, (ts, values)


def test_a_wrong_width_array_part_is_refused_like_the_lists() -> None:
    part = part_of("d", [(1, [1.0, 2.0, 3.0])])
    assert isinstance(part[1], np.ndarray)
    got = ReadingBatch.from_parts([part], CHANNELS)
    assert got.reject.tolist() == ["wrong_channel_count"]
    assert np.isnan(got.values).all()


def test_chunks_cross_the_pipe_unchanged() -> None:
    docs = [
        {"readings": [{"ts": 1767225600 + 60 * k, "values": [20.5 + k, 1]} for k in range(50)]},
        {"ts": 1767225600, "values": [1.5, None]},  # not clean: as parsed
        {"ts": 1767225600.5, "values": [1.5, 2.5]},
        {"readings": [{"ts": 1, "values": [1.0]}, 7]},
    ]
    msgs = []
    for i, doc in enumerate(docs):
        items = doc.get("readings", [doc])
        ts = [it.get("ts", math.nan) if isinstance(it, dict) else math.nan for it in items]
        values = [it.get("values") if isinstance(it, dict) else None for it in items]
        clean = clean_columns(ts, values)
        head = (f"s/d{i}/r", orjson.dumps(doc), 1, i, False, i == 2, bytes(16), f"d{i}")
        if clean is None:
            msgs.append(ParsedMessage(*head, ts, values))
        else:
            msgs.append(ParsedMessage(*head, clean[0], clean[1], width=clean[2]))
    refused = ("s/x", b"[", 1, 9, False, False, bytes(16), None, [], [], "malformed_json", "no")
    msgs.append(ParsedMessage(*refused))
    back = decode_chunk(encode_chunk(msgs))
    assert [m[:8] + m[10:] for m in back] == [m[:8] + m[10:] for m in msgs]
    for sent, got in zip(msgs, back, strict=True):
        if sent.width < 0:
            assert got.ts == sent.ts
            assert got.values == sent.values
        else:
            np.testing.assert_array_equal(got.ts, np.array(sent.ts, dtype=np.float64))
            np.testing.assert_array_equal(got.values.ravel(), np.array(sent.values, dtype=np.float64))
            assert got.values.shape == (len(sent.ts), sent.width)
