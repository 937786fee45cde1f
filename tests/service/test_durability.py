"""Engine durability in-process: the write-ahead log, snapshots that record their sequence, recovery.

A "crash" here abandons an engine once its log is durable (nothing else is written: no snapshot, no
close); the kill -9 tests in tests/e2e/test_faults.py and test_crash.py kill real processes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sensorwatch.state.records import MessageMeta
from service.engine import Engine, RecoveryError
from service.metrics import Metrics
from service.payloads import message_digest
from service.settings import load_settings
from tests.support import build_artifacts

T0 = 1_767_225_600.0
DEVICES = [f"d{i}" for i in range(7)]


def engine(state: Path, **kw: Any) -> Engine:
    params: dict[str, Any] = {"model": "builtin", "mqtt_url": "", "state_dir": state, **kw}
    return Engine(load_settings(**params), Metrics(mqtt=False))


def batches(n: int, seed: int = 0, start: int = 0) -> list[tuple[list[str], list[Any], list[Any]]]:
    """``n`` micro-batches of 1-3 readings for each of a few devices (a spike now and then)."""
    rng = np.random.default_rng(seed)
    out, k = [], start
    for _ in range(n):
        ids, ts, vals = [], [], []
        for d in rng.choice(DEVICES, size=4, replace=False).tolist():
            for _ in range(int(rng.integers(1, 4))):
                k += 1
                v = float(np.sin(k / 9) + rng.normal(0, 0.1) + (25.0 if rng.random() < 0.03 else 0.0))
                ids.append(d)
                ts.append(T0 + k)
                vals.append([v])
        out.append((ids, ts, vals))
    return out


def feed(e: Engine, work: list[tuple[list[str], list[Any], list[Any]]]) -> list[int]:
    seqs = []
    for ids, ts, vals in work:
        meta = [
            MessageMeta("mqtt", f"s/{i}/r", message_digest(f"s/{i}/r", repr(t).encode()), 1)
            for i, t in zip(ids, ts, strict=True)
        ]
        seq, _, result = e.apply(ids, ts, vals, meta)
        assert result is not None
        seqs.append(seq)
    return seqs


def crash(e: Engine) -> None:
    """Abandon ``e`` as a kill -9 would, once its log is durable (the writer is stopped only so the
    next engine in this process has the directory to itself)."""
    if e.wal is not None:
        assert e.wait_durable(e.applied_seq, 10)
        e.wal._closed = True
        with e.wal._cond:
            e.wal._cond.notify_all()


def state_of(e: Engine) -> dict[str, dict[str, torch.Tensor]]:
    return e.scorer.store.copy_rows(e.scorer.store.device_ids())


def assert_same_state(a: Engine, b: Engine) -> None:
    sa, sb = state_of(a), state_of(b)
    assert sorted(sa) == sorted(sb)
    for dev in sa:
        for col, t in sa[dev].items():
            u = sb[dev][col]
            same = (t == u) | (torch.isnan(t) & torch.isnan(u)) if t.is_floating_point() else t == u
            assert bool(same.all()), (dev, col)  # bit for bit: the same batches replayed


def test_recovery_from_the_log_alone_gives_the_same_state(tmp_path: Path) -> None:
    work = batches(40)
    ref = engine(tmp_path / "ref", wal_sync="off")
    feed(ref, work)
    a = engine(tmp_path / "a")
    a.recover()
    feed(a, work)
    crash(a)
    b = engine(tmp_path / "a")
    r = b.recover()
    assert r.restored_devices == 0
    assert r.replayed_readings == sum(len(ids) for ids, _, _ in work)
    assert_same_state(ref, b)
    assert_same_state(a, b)
    b.close()


def test_snapshot_records_its_sequence_and_recovery_replays_only_what_follows(tmp_path: Path) -> None:
    work = batches(60)
    a = engine(tmp_path)
    a.recover()
    seqs = feed(a, work[:30])
    a.snapshot()
    feed(a, work[30:])
    crash(a)
    b = engine(tmp_path)
    r = b.recover()
    assert r.snapshot_seq == seqs[-1]
    assert r.replayed_readings == sum(len(ids) for ids, _, _ in work[30:])
    assert_same_state(a, b)
    # Every reading of the run after the snapshot is a redelivery candidate, and so are the recent ones.
    assert len(b.redelivery_digests()) >= r.replayed_readings
    b.close()


def test_next_scores_after_recovery_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    work = batches(50)
    ref = engine(tmp_path / "ref", wal_sync="off")
    feed(ref, work[:40])
    a = engine(tmp_path / "a")
    a.recover()
    feed(a, work[:40])
    crash(a)
    b = engine(tmp_path / "a")
    b.recover()
    for ids, ts, vals in work[40:]:
        want = ref.apply(ids, ts, vals, [])[2]
        got = b.apply(ids, ts, vals, [])[2]
        assert want is not None
        assert got is not None
        np.testing.assert_array_equal(got.likelihood, want.likelihood)
        np.testing.assert_array_equal(got.raw_score, want.raw_score)
    b.close()


def test_snapshots_delete_the_log_they_cover(tmp_path: Path) -> None:
    a = engine(tmp_path)
    a.recover()
    assert a.wal is not None
    a.wal.segment_bytes = 1  # a segment per group commit
    for w in batches(10):
        feed(a, [w])
        a.wait_durable(a.applied_seq, 5)
    assert len(list((tmp_path / "wal").glob("*.log"))) >= 10
    a.snapshot()
    assert len(list((tmp_path / "wal").glob("*.log"))) == 1
    crash(a)
    b = engine(tmp_path)
    assert b.recover().replayed_records == 0
    assert_same_state(a, b)
    b.close()


def test_device_resets_and_model_reloads_are_replayed(tmp_path: Path) -> None:
    build_artifacts(tmp_path / "models")
    kw = {"model": "uni/1", "models_dir": tmp_path / "models"}
    a = engine(tmp_path / "s", **kw)
    a.recover()
    work = batches(30)
    feed(a, work[:10])
    assert a.reset("d1")[0]
    feed(a, work[10:20])
    a.reload("uni/2")  # same architecture, other weights: state kept, later scores differ
    feed(a, work[20:])
    crash(a)
    b = engine(tmp_path / "s", **kw)
    r = b.recover()
    assert r.replayed_records >= 32
    # The configured model serves again after recovery (a reload lasts until restart) ...
    assert b.scorer.model_version == "uni/1"
    # ... but the state was rebuilt with uni/2 where uni/2 had served.
    assert_same_state(a, b)
    b.close()


def test_outputs_after_the_last_done_mark_are_kept_for_republishing(tmp_path: Path) -> None:
    a = engine(tmp_path)
    a.recover()
    seqs = feed(a, batches(20))
    a.wait_durable(seqs[-1], 5)
    a.log_done(seqs[11])
    feed(a, batches(5, seed=1, start=10_000))
    crash(a)
    b = engine(tmp_path)
    r = b.recover()
    assert [p.seq for p in r.unpublished][:8] == seqs[12:]
    assert len(r.unpublished) == 8 + 5
    b.close()


def test_a_torn_tail_recovers_and_a_corrupt_middle_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = engine(tmp_path)
    a.recover()
    seqs = feed(a, batches(5))
    crash(a)
    (seg,) = sorted((tmp_path / "wal").glob("*.log"))
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])
    with caplog.at_level(logging.WARNING, logger="sensorwatch.wal"):
        b = engine(tmp_path)
        r = b.recover()
    assert r.replayed_records == len(seqs) - 1
    assert "torn last record" in caplog.text
    b.close()
    (seg2,) = [p for p in sorted((tmp_path / "wal").glob("*.log")) if p != seg]
    bad = bytearray(seg.read_bytes())
    bad[40] ^= 0x01
    seg.write_bytes(bytes(bad))
    with pytest.raises(RecoveryError, match=rf"{seg}.*offset"):
        engine(tmp_path).recover()
    assert seg2.exists()


def test_wal_off_writes_no_log(tmp_path: Path) -> None:
    a = engine(tmp_path, wal_sync="off")
    a.recover()
    feed(a, batches(3))
    assert a.wal is None
    assert not (tmp_path / "wal").exists()


def test_message_digest_covers_the_whole_topic() -> None:
    """Long device ids sharing a 64-byte topic prefix, same payload: different messages (they were
    one digest, and after a restart the second was acked as a redelivery, unscored)."""
    payload = b'{"ts": 1767225600, "values": [1.0]}'
    a, b = "sensors/" + "a" * 70 + "/readings", "sensors/" + "a" * 71 + "/readings"
    assert message_digest(a, payload) != message_digest(b, payload)
    assert message_digest("x/ab", b"c") != message_digest("x/a", b"bc")  # the topic is length-prefixed
    assert message_digest(a, payload) == message_digest(a, payload)
