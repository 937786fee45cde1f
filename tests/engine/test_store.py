"""DeviceStateStore: growth, LRU, reset, TTL, atomic pickle-free snapshots and restore."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from sensorwatch.state import store as store_module
from sensorwatch.state.store import (
    LAST_SEEN,
    SNAPSHOT_FORMAT,
    CapacityError,
    ColumnSpec,
    DeviceStateStore,
    StateIncompatibleError,
)

COLUMNS = {
    "h": ColumnSpec((2, 3), torch.float32),
    "n": ColumnSpec((), torch.float64),
    "lo": ColumnSpec((2,), torch.float64, math.inf),
    "flag": ColumnSpec((), torch.bool),
}


def make_store(**kw) -> DeviceStateStore:
    kw.setdefault("max_devices", 100)
    kw.setdefault("chunk", 4)
    return DeviceStateStore(dict(COLUMNS), identity={"model": "test/1"}, **kw)


def write(store: DeviceStateStore, device_ids: list[str]) -> None:
    """Give each device a distinctive row: h = n = its numeric suffix."""
    rows = store.rows_for(device_ids)
    for d, r in zip(device_ids, rows.tolist(), strict=True):
        k = float(d.split("-")[1])
        store.columns["h"][r] = k
        store.columns["n"][r] = k
        store.columns["lo"][r] = -k
        store.columns["flag"][r] = True


def assert_row(store: DeviceStateStore, device_id: str) -> None:
    k = float(device_id.split("-")[1])
    row = store.copy_rows([device_id])[device_id]
    assert torch.equal(row["h"], torch.full((2, 3), k))
    assert row["n"].item() == k
    assert torch.equal(row["lo"], torch.full((2,), -k, dtype=torch.float64))
    assert row["flag"].item() is True


def assert_fresh(store: DeviceStateStore, row: int) -> None:
    for name, spec in COLUMNS.items():
        value = store.columns[name][row]
        assert torch.equal(value, torch.full(spec.shape, spec.fill, dtype=spec.dtype)), name


def tmp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- growth
def test_growth_keeps_values_and_fills_new_rows() -> None:
    store = make_store(max_devices=50, chunk=4)
    assert store.capacity == 4
    capacities = [store.capacity]
    ids: list[str] = []
    for start in range(0, 50, 3):
        new = [f"dev-{i}" for i in range(start, min(start + 3, 50))]
        write(store, new)
        ids += new
        capacities.append(store.capacity)
        for d in ids:  # every earlier device still holds its values
            assert_row(store, d)
    assert len(store) == 50
    assert capacities == sorted(capacities)
    assert capacities[-1] == 50  # never beyond max_devices
    assert store.evictions == {"lru": 0, "ttl": 0}
    for name, spec in COLUMNS.items():
        assert store.columns[name].shape == (50, *spec.shape)
        assert store.columns[name].dtype == spec.dtype


def test_new_rows_start_from_the_fill_value() -> None:
    store = make_store(chunk=2)
    rows = store.rows_for(["a", "b", "c", "d", "e"])  # grows twice
    assert len(set(rows.tolist())) == 5
    for r in rows.tolist():
        assert_fresh(store, r)


def test_initial_capacity_is_capped_by_max_devices() -> None:
    assert make_store(max_devices=3, chunk=1024).capacity == 3
    with pytest.raises(ValueError):
        make_store(max_devices=0)
    with pytest.raises(ValueError):
        make_store(chunk=0)


# ---------------------------------------------------------------------------------------------- LRU
def test_lru_evicts_least_recently_used_and_touch_refreshes() -> None:
    store = make_store(max_devices=3, chunk=3)
    write(store, ["dev-1"])
    write(store, ["dev-2"])
    write(store, ["dev-3"])
    store.rows_for(["dev-1"])  # dev-1 is now the most recent; dev-2 the least
    write(store, ["dev-4"])
    assert sorted(store.device_ids()) == ["dev-1", "dev-3", "dev-4"]
    assert store.evictions == {"lru": 1, "ttl": 0}
    store.touch(np.array([store.row_of("dev-3")]))  # explicit touch refreshes too
    write(store, ["dev-5"])
    assert sorted(store.device_ids()) == ["dev-3", "dev-4", "dev-5"]
    assert store.evictions["lru"] == 2
    for d in store.device_ids():
        assert_row(store, d)


def test_lookup_does_not_touch() -> None:
    store = make_store(max_devices=2, chunk=2)
    write(store, ["dev-1"])
    write(store, ["dev-2"])
    assert store.lookup(["dev-1", "nope"]).tolist() == [store.row_of("dev-1"), -1]
    write(store, ["dev-3"])  # dev-1 is still the least recently used
    assert sorted(store.device_ids()) == ["dev-2", "dev-3"]


def test_evicted_row_is_reinitialised_for_its_next_owner() -> None:
    store = make_store(max_devices=2, chunk=2)
    write(store, ["dev-1", "dev-2"])
    row = store.row_of("dev-1")
    store.rows_for(["dev-2"])
    new_row = store.rows_for(["dev-9"])[0]
    assert new_row == row
    assert "dev-1" not in store
    assert_fresh(store, row)


def test_batch_members_are_never_evicted_for_each_other() -> None:
    store = make_store(max_devices=3, chunk=3)
    write(store, ["dev-1", "dev-2", "dev-3"])
    rows = store.rows_for(["dev-3", "dev-7", "dev-8"])  # dev-3 is in the batch: evict 1 and 2
    assert sorted(store.device_ids()) == ["dev-3", "dev-7", "dev-8"]
    assert rows[0] == store.row_of("dev-3")
    assert_row(store, "dev-3")
    with pytest.raises(CapacityError):
        store.rows_for(["dev-10", "dev-11", "dev-12", "dev-13"])


# ---------------------------------------------------------------------------------------------- reset / TTL
def test_reset_frees_the_row() -> None:
    store = make_store(max_devices=2, chunk=2)
    write(store, ["dev-1", "dev-2"])
    row = store.row_of("dev-1")
    assert store.reset("dev-1") is True
    assert "dev-1" not in store
    assert len(store) == 1
    assert store.reset("dev-1") is False
    assert_fresh(store, row)
    # The freed row is reused without evicting anyone.
    write(store, ["dev-3"])
    assert store.row_of("dev-3") == row
    assert sorted(store.device_ids()) == ["dev-2", "dev-3"]
    assert store.evictions == {"lru": 0, "ttl": 0}
    assert_row(store, "dev-2")


def test_ttl_expiry_uses_the_clock() -> None:
    now = [0.0]
    store = make_store(ttl_s=10.0, clock=lambda: now[0])
    write(store, ["dev-1", "dev-2"])
    now[0] = 5.0
    store.rows_for(["dev-2"])
    now[0] = 12.0
    assert store.expire() == 1
    assert store.device_ids() == ["dev-2"]
    assert store.evictions == {"lru": 0, "ttl": 1}
    assert store.expire(now=100.0) == 1
    assert len(store) == 0
    assert store.evictions["ttl"] == 2
    assert make_store().expire(now=1e9) == 0  # no TTL: never


# ---------------------------------------------------------------------------------------------- snapshots
def test_snapshot_is_plain_safetensors_without_pickle(tmp_path) -> None:
    store = make_store()
    write(store, ["dev-1", "dev-2", "dev-3"])
    store.rows_for(["dev-1"])
    path = tmp_path / "state.safetensors"
    assert store.snapshot(path, extra={"note": "x"}) == path
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["format"] == SNAPSHOT_FORMAT == "sensorwatch-state/1"
    assert json.loads(meta["identity"]) == store.identity
    assert json.loads(meta["ids"]) == ["dev-2", "dev-3", "dev-1"]  # LRU order, oldest first
    assert json.loads(meta["extra"]) == {"note": "x"}
    assert keys == {*COLUMNS, LAST_SEEN}  # the idle clock of each device travels with its state
    tensors = load_file(str(path))
    assert tensors["h"].shape == (3, 2, 3)  # compacted to the occupied rows
    assert tensors["n"].tolist() == [2.0, 3.0, 1.0]
    # safetensors: 8-byte little-endian header length, then a JSON header; no pickle opcodes.
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    json.loads(raw[8 : 8 + header_len])
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    assert b"PK\x03\x04" not in raw[:4]  # not a torch.save zip archive


def test_snapshot_does_not_alias_live_state(tmp_path) -> None:
    store = make_store()
    write(store, ["dev-1"])
    path = tmp_path / "s.safetensors"
    store.snapshot(path)
    store.columns["n"][store.row_of("dev-1")] = 99.0
    assert load_file(str(path))["n"].tolist() == [1.0]


def test_snapshot_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    store = make_store()
    write(store, ["dev-1", "dev-2"])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    store.snapshot(path)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    (tmp_path / "nested").mkdir()
    store.snapshot(tmp_path / "nested" / "deeper" / "s.safetensors")  # parents are created
    assert [p.name for p in (tmp_path / "nested" / "deeper").iterdir()] == ["s.safetensors"]


def test_failed_snapshot_write_leaves_old_file_intact(tmp_path, monkeypatch) -> None:
    store = make_store()
    write(store, ["dev-1", "dev-2"])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    old = path.read_bytes()

    write(store, ["dev-3"])
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"torn half-written snapshot")  # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        store.snapshot(path)
    assert calls, "the injected failure was not reached"
    assert Path(calls[0]) != path  # it wrote to a temporary file, not the target
    assert path.read_bytes() == old
    assert tmp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]
    # The old snapshot still restores.
    fresh = make_store()
    fresh.restore(path)
    assert sorted(fresh.device_ids()) == ["dev-1", "dev-2"]


def test_restore_round_trip_preserves_rows_lru_order_and_counters(tmp_path) -> None:
    store = make_store(max_devices=4, chunk=2)
    write(store, ["dev-1", "dev-2", "dev-3", "dev-4"])
    write(store, ["dev-5"])  # evicts dev-1
    store.rows_for(["dev-2"])  # LRU order now: 3, 4, 5, 2
    path = tmp_path / "state.safetensors"
    store.snapshot(path, extra={"model_version": "v7"})

    fresh = make_store(max_devices=4, chunk=2)
    write(fresh, ["dev-8"])  # restore replaces everything
    assert fresh.restore(path) == {"model_version": "v7"}
    assert sorted(fresh.device_ids()) == ["dev-2", "dev-3", "dev-4", "dev-5"]
    for d in fresh.device_ids():
        assert_row(fresh, d)
    assert fresh.evictions == {"lru": 1, "ttl": 0}
    write(fresh, ["dev-6"])  # the least recently used at snapshot time goes first
    assert "dev-3" not in fresh
    assert sorted(fresh.device_ids()) == ["dev-2", "dev-4", "dev-5", "dev-6"]


def test_restore_into_a_smaller_store_keeps_the_most_recent(tmp_path) -> None:
    store = make_store(max_devices=10)
    for i in range(6):
        write(store, [f"dev-{i}"])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    small = make_store(max_devices=3, chunk=1)
    small.restore(path)
    assert sorted(small.device_ids()) == ["dev-3", "dev-4", "dev-5"]
    for d in small.device_ids():
        assert_row(small, d)
    # The restored rows are usable: a new device evicts the oldest of them.
    write(small, ["dev-9"])
    assert sorted(small.device_ids()) == ["dev-4", "dev-5", "dev-9"]


def test_restore_into_a_larger_store_grows_it(tmp_path) -> None:
    store = make_store(max_devices=40, chunk=40)
    write(store, [f"dev-{i}" for i in range(30)])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    big = make_store(max_devices=100, chunk=4)
    big.restore(path)
    assert len(big) == 30
    assert big.capacity >= 30
    for d in big.device_ids():
        assert_row(big, d)
    write(big, ["dev-77"])
    assert len(big) == 31


def test_restore_refuses_other_identity_and_non_snapshots(tmp_path) -> None:
    store = make_store()
    write(store, ["dev-1"])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    other_model = DeviceStateStore(dict(COLUMNS), identity={"model": "test/2"})
    with pytest.raises(StateIncompatibleError, match="model"):
        other_model.restore(path)
    other_layout = DeviceStateStore(
        {**COLUMNS, "extra": ColumnSpec((1,), torch.float32)}, identity={"model": "test/1"}
    )
    with pytest.raises(StateIncompatibleError, match="columns"):
        other_layout.restore(path)

    plain = tmp_path / "plain.safetensors"  # valid safetensors, not a sensorwatch snapshot
    save_file({"n": torch.zeros(1)}, str(plain), metadata={"format": "something-else"})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\xff" * 64)
    pickled = tmp_path / "pickled.pt"
    torch.save({"n": torch.zeros(1)}, pickled)
    for bad in (plain, truncated, garbage, pickled, tmp_path / "missing.safetensors"):
        fresh = make_store()
        write(fresh, ["dev-5"])
        with pytest.raises(StateIncompatibleError):
            fresh.restore(bad)
        assert fresh.device_ids() == ["dev-5"]  # left untouched
        assert_row(fresh, "dev-5")


def test_restore_round_trips_a_column_whose_fill_is_nan(tmp_path) -> None:
    """Bug: a NaN fill value (StreamScorer's ``prev_x`` column has one) is part of the identity, and
    NaN != NaN after the JSON round trip, so restore refuses every such snapshot — even into the
    store that wrote it."""
    columns = {**COLUMNS, "prev": ColumnSpec((2,), torch.float64, math.nan)}
    store = DeviceStateStore(dict(columns), identity={"model": "test/1"})
    store.rows_for(["dev-1"])
    path = tmp_path / "state.safetensors"
    store.snapshot(path)
    store.restore(path)
    assert store.device_ids() == ["dev-1"]


def test_a_snapshot_of_another_state_version_is_refused(tmp_path) -> None:
    """Same columns, other meaning (the scorer's STATE_VERSION): refused, not silently misread."""
    from sensorwatch import StreamScorer
    from sensorwatch.scoring import scorer as scorer_mod

    a = StreamScorer.builtin()
    path = tmp_path / "s.safetensors"
    a.snapshot(str(path))
    meta_version = scorer_mod.STATE_VERSION
    try:
        scorer_mod.STATE_VERSION = meta_version + 1
        b = StreamScorer.builtin()
    finally:
        scorer_mod.STATE_VERSION = meta_version
    with pytest.raises(StateIncompatibleError, match="state_version"):
        b.restore(str(path))
