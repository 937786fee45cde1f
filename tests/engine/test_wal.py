"""The write-ahead log's framing, recovery scan and group commit (sensorwatch/state/wal.py)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from sensorwatch.scoring.batch import ReadingBatch
from sensorwatch.state import records as rec
from sensorwatch.state.wal import HEADER, WalCorruptError, WriteAheadLog, encode_frame, segment_name


def write_log(d: Path, payloads: list[bytes], **kw: object) -> WriteAheadLog:
    wal = WriteAheadLog(d, **kw)  # type: ignore[arg-type]
    assert list(wal.open()) == []
    wal.start()
    for p in payloads:
        wal.append(p)
    wal.close()
    return wal


def read_back(d: Path, after: int = 0) -> list[tuple[int, bytes]]:
    return [(seq, bytes(p)) for seq, p in WriteAheadLog(d).open(after=after)]


PAYLOADS = [bytes([i]) * (3 + 7 * i) for i in range(5)]


def only_segment(d: Path) -> Path:
    (seg,) = sorted(d.glob("*.log"))
    return seg


def test_records_come_back_in_order_with_their_sequence_numbers(tmp_path: Path) -> None:
    write_log(tmp_path, PAYLOADS)
    assert read_back(tmp_path) == list(enumerate(PAYLOADS, start=1))
    assert read_back(tmp_path, after=3) == [(4, PAYLOADS[3]), (5, PAYLOADS[4])]


def test_a_torn_last_record_is_cut_at_every_byte_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_log(tmp_path / "src", PAYLOADS)
    full = only_segment(tmp_path / "src").read_bytes()
    last = len(encode_frame(5, PAYLOADS[4]))
    start = len(full) - last
    for cut in range(start, len(full)):  # every length of the last frame but the whole one
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / segment_name(1)).write_bytes(full[:cut])
        with caplog.at_level(logging.WARNING, logger="sensorwatch.wal"):
            got = read_back(d)
        assert got == list(enumerate(PAYLOADS[:4], start=1)), cut
        assert only_segment(d).stat().st_size == start, "the torn bytes are truncated away"
        if cut > start:
            assert f"offset {start}" in caplog.text
        caplog.clear()


@pytest.mark.parametrize("zeros", [1, HEADER.size, 4096])
def test_a_zero_filled_tail_is_a_torn_tail(tmp_path: Path, zeros: int) -> None:
    write_log(tmp_path, PAYLOADS)
    seg = only_segment(tmp_path)
    seg.write_bytes(seg.read_bytes() + b"\0" * zeros)
    assert read_back(tmp_path) == list(enumerate(PAYLOADS, start=1))


def test_a_last_record_whose_payload_was_zeroed_is_torn(tmp_path: Path) -> None:
    """A host crash can leave the blocks of an unfinished write zero-filled: header there, payload 0s."""
    write_log(tmp_path, PAYLOADS)
    seg = only_segment(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-len(PAYLOADS[4]) :] = b"\0" * len(PAYLOADS[4])
    seg.write_bytes(bytes(data))
    assert read_back(tmp_path) == list(enumerate(PAYLOADS[:4], start=1))


@pytest.mark.parametrize("where", ["header", "length", "payload"])
def test_a_flipped_bit_in_a_middle_record_refuses_with_file_and_offset(tmp_path: Path, where: str) -> None:
    write_log(tmp_path, PAYLOADS)
    seg = only_segment(tmp_path)
    data = bytearray(seg.read_bytes())
    second = len(encode_frame(1, PAYLOADS[0]))
    byte = {"length": second, "header": second + 5, "payload": second + HEADER.size + 2}[where]
    data[byte] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError) as err:
        read_back(tmp_path)
    assert str(seg) in str(err.value)
    assert f"offset {second}" in str(err.value)
    assert seg.read_bytes() == bytes(data), "nothing is truncated when the log is refused"


def test_a_gap_in_the_sequence_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, PAYLOADS[:2])
    seg = only_segment(tmp_path)
    seg.write_bytes(seg.read_bytes() + encode_frame(4, b"skipped three"))
    with pytest.raises(WalCorruptError, match="gap"):
        read_back(tmp_path)


def test_a_log_that_resumes_after_the_snapshot_refuses(tmp_path: Path) -> None:
    """Records 1..5 in segments of one record each; the first segment is lost and the snapshot covers
    none of them (or, second case, every segment but the empty current one is lost)."""
    wal = WriteAheadLog(tmp_path, segment_bytes=1)  # a new segment after every group commit
    list(wal.open())
    wal.start()
    for p in PAYLOADS:
        wal.wait_durable(wal.append(p), 5)
    wal.close()
    segments = sorted(tmp_path.glob("*.log"))
    segments[0].unlink()
    with pytest.raises(WalCorruptError, match="missing"):
        read_back(tmp_path, after=0)
    for seg in segments[1:-1]:
        seg.unlink()
    with pytest.raises(WalCorruptError, match="missing"):
        read_back(tmp_path, after=2)


def test_a_torn_record_in_an_older_segment_refuses(tmp_path: Path) -> None:
    write_log(tmp_path, PAYLOADS, segment_bytes=1)
    first = sorted(tmp_path.glob("*.log"))[0]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(WalCorruptError, match="older segment"):
        read_back(tmp_path)


def test_appending_resumes_after_recovery_in_a_new_segment(tmp_path: Path) -> None:
    write_log(tmp_path, PAYLOADS[:3])
    wal = WriteAheadLog(tmp_path)
    assert len(list(wal.open())) == 3
    wal.start()
    assert wal.append(b"next") == 4
    wal.close()
    assert read_back(tmp_path)[-1] == (4, b"next")
    assert len(list(tmp_path.glob("*.log"))) == 2


def test_segments_covered_by_a_snapshot_are_dropped_but_never_the_current_one(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment_bytes=1)
    list(wal.open())
    wal.start()
    for p in PAYLOADS:
        wal.wait_durable(wal.append(p), 5)
    assert wal.segment_count() == 6  # five full segments + the empty current one
    assert wal.drop_through(3) == 3
    assert [seq for seq, _ in WriteAheadLog(tmp_path).open(after=3)] == [4, 5]
    assert wal.drop_through(99) == 2
    assert wal.segment_count() == 1
    wal.close()


def test_everything_on_disk_older_than_the_snapshot_is_replaced(tmp_path: Path) -> None:
    """With WAL_SYNC=none a host crash can lose log records a snapshot already covers."""
    write_log(tmp_path, PAYLOADS[:2])
    wal = WriteAheadLog(tmp_path)
    assert list(wal.open(after=7)) == []
    wal.start()
    assert wal.append(b"x") == 8
    wal.close()
    assert read_back(tmp_path, after=7) == [(8, b"x")]


def test_one_sync_covers_every_record_appended_meanwhile(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, sync="fsync")
    list(wal.open())
    wal.start()
    threads = [
        threading.Thread(target=lambda: [wal.append(b"r" * 100) for _ in range(500)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wal.wait_durable(2000, 30)
    wal.close()
    assert wal.syncs < 2000, "group commit: fewer syncs than records"
    assert [s for s, _ in read_back(tmp_path)] == list(range(1, 2001))


def test_batch_records_round_trip_exactly() -> None:
    batch = ReadingBatch(
        ["a", "b", "a"],
        [1.5, 2.0, 3.0],
        np.array([[0.1, np.nan], [1e300, -0.0], [np.nan, np.nan]]),
        np.array([None, "bad_value", None], dtype=object),
    )
    meta = [
        rec.MessageMeta("mqtt", "s/a/r", b"\x07" * 16, 2),
        rec.MessageMeta("mqtt", "s/b/r", b"", 0, "x", "y"),
    ]
    back = rec.decode(rec.encode(rec.BatchRecord(123.25, batch, meta)))
    assert isinstance(back, rec.BatchRecord)
    assert (back.clock, back.messages, back.batch.device_ids) == (123.25, meta, batch.device_ids)
    assert back.batch.values.tobytes() == batch.values.tobytes()  # bit for bit, NaN and -0.0 too
    assert back.batch.ts.tobytes() == batch.ts.tobytes()
    assert back.batch.reject.tolist() == batch.reject.tolist()
    for r in (rec.ResetRecord("d"), rec.ReloadRecord("m/2", "ab"), rec.DoneRecord(9)):
        assert rec.decode(rec.encode(r)) == r
