"""Per-device state: rows of preallocated tensors, bounded, snapshot/restore."""

from sensorwatch.state.store import CapacityError, ColumnSpec, DeviceStateStore, StateIncompatibleError

__all__ = ["CapacityError", "ColumnSpec", "DeviceStateStore", "StateIncompatibleError"]
