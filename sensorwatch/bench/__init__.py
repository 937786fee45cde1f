"""Benchmarks (separate commands, never timed unit tests)."""
