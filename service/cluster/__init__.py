"""Cluster mode: several workers share a fleet's devices through NATS JetStream (``SENSORWATCH_NATS_URL``).

- :mod:`.topology` — names: streams, subjects, buckets, and the server's partition mapping.
- :mod:`.leases` — who owns which partition (KV leases with a TTL, compare-and-set).
- :mod:`.partition` — one partition's devices: a scorer, the last stream sequence applied, checkpoints.
- :mod:`.worker` — a worker: membership, balancing, one ordered consumer per owned partition.
- :mod:`.app` — the worker's HTTP face (health, metrics, ownership, scoring).

This package and :mod:`service.cluster.bus` are the only ones that import ``nats``.
"""
