"""A cluster worker: owns a share of the partitions through leases, consumes each in stream order,
scores it with the same scorer as the single-node service, publishes its outcomes through JetStream,
and checkpoints each partition so that another worker can continue it exactly.

Ownership (all in the KV bucket ``sw_<group>_leases``, whose TTL is ``LEASE_TTL_S``):

1. A worker announces itself: key ``m.<worker>``, rewritten every third of the TTL. The live members
   are the keys rewritten within the TTL (seen through a KV watch).
2. Its share is ``ceil((P + 1) / members)`` partitions (``P`` readings partitions + the unrouted one).
3. It acquires a free partition by compare-and-set on ``p.<n>``: ``create`` (against "no such key")
   once the key is deleted or expired (the bucket's max age is the TTL), or ``update`` against the
   revision the bucket's leader holds, read unchanged for the TTL plus the fence margin (its owner
   stopped renewing and has fenced itself: step 5). Of two workers trying, one wins. So a dead
   worker's partitions become free ``LEASE_TTL_S`` after its last renewal, without anyone deciding
   it died — also when the server does not expire the key (seen after the bucket's leader died).
4. It renews each owned lease with ``update(last=revision)``: a renewal that finds another revision
   means it lost the partition, and it drops it at once.
5. It fences itself: a partition whose lease it could not renew for ``TTL - FENCE_MARGIN_S`` (counted
   from the start of the last successful renewal, so never later than the server's own expiry) stops
   publishing and is dropped — without a checkpoint — before any other worker can acquire it.
6. Above its share (a worker joined) it releases one partition at a time: stop consuming after the
   batch in hand, checkpoint, delete the lease (``last=revision``). Release → checkpoint → acquire:
   never two owners, and the next owner continues from the checkpoint without replay.

Each owned partition (see :mod:`.partition` for why this is exact):

1. Restore its checkpoint ``{S, state}`` from the object store ``sw_<group>_checkpoints`` (none yet: a
   fresh state from sequence 0; one of another model or layout: moved past with a log line, and the
   partition's state rebuilt from the stream's retained history).
2. Consume ``sw.in.<p>.*`` from ``S + 1`` with an ephemeral ordered consumer (no acks: the checkpoint
   is the position); a gap in the consumer's own sequence (a message not delivered) recreates the
   consumer from the last applied sequence, so nothing is skipped.
3. Parse each fetched run in the parse process (:mod:`.parsing`: off the GIL of this one), score it
   as one step, then publish its outcomes with JetStream acks, each with a
   ``Nats-Msg-Id`` of its kind and ``event_id``: the outputs stream keeps one copy of an outcome
   published again after a takeover (within its duplicate window); MQTT subscribers see it again,
   with the same ``event_id``.
4. Checkpoint every ``CHECKPOINT_INTERVAL_S`` and on release, only between runs whose outcomes are all
   acked: a checkpoint is never ahead of the outcomes it covers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
import torch
from nats.js import api

from sensorwatch.artifacts import DEFAULT_MODEL, load_default_or_builtin
from sensorwatch.scoring import kernel
from sensorwatch.state.store import StateIncompatibleError
from service.cluster.parsing import ParseProcess, ParseProcessDied
from service.cluster.partition import CheckpointMismatch, PartitionState, StreamMessage
from service.cluster.topology import OUTPUTS_STREAM, READINGS_STREAM, Topology
from service.engine import split_ref
from service.metrics import Metrics
from service.runtime import EXIT_FAILED, WATCHDOG_EXIT_AFTER_S, exit_process, freeze_heap
from service.settings import Settings, scorer_config

log = logging.getLogger("sensorwatch.cluster")

FENCE_MARGIN_S = 0.5
BALANCE_INTERVAL_S = 0.25
FETCH_BATCH = 2000
FETCH_TIMEOUT_S = 0.25
#: A consumer that delivered nothing this long is checked to still exist.
IDLE_CHECK_S = 2.0
#: The longest a checkpoint may take to read or write before the attempt is given up (and retried).
OBJECT_STORE_TIMEOUT_S = 5.0
#: How long a dropped partition's state is kept for taking it back without a checkpoint read.
PARKED_S = 60.0
#: Outcomes published at once (each awaits its JetStream ack).
PUBLISH_CONCURRENCY = 1000
#: How long the outputs stream recognises an outcome published again (a takeover replays at most a
#: checkpoint interval plus the lease TTL): 2 minutes, JetStream's default.
DUPLICATE_WINDOW_S = 120.0
#: The readings stream keeps this much history (a checkpoint older than it cannot be replayed).
READINGS_MAX_AGE_S = 7 * 86_400.0
OUTPUTS_MAX_AGE_S = 86_400.0
#: The oldest nats-server whose replicated streams check ``Nats-Expected-Last-Subject-Sequence``
#: inside the write's consensus: before it the check was a pre-check on the leader, so two
#: concurrent compare-and-sets of one key could both succeed (nats-server issue 4320, seen here on
#: Debian's 2.9.10 as two workers acquiring one partition within 8-16 ms). Step 3 of the
#: ownership protocol needs it.
MIN_SERVER_VERSION = (2, 9, 21)


def server_version(version: Any) -> tuple[int, int, int]:
    """(major, minor, patch) of a nats-py ``ServerVersion``; (0, 0, 0) when it cannot be read."""
    try:
        return (int(version.major), int(version.minor), int(version.patch))
    except (TypeError, ValueError):
        return (0, 0, 0)


class ClusterConfigError(RuntimeError):
    """The NATS side is set up in a way cluster mode cannot keep its promises with."""


class Fenced(RuntimeError):
    """The lease may have lapsed: this worker must not publish for the partition any more."""


@dataclass
class Owned:
    state: PartitionState
    revision: int
    valid_until: float  # time.monotonic(): the lease certainly holds until then
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    checkpointed: int = -1
    checkpoint_at: float = field(default_factory=time.monotonic)
    lag: int = 0
    #: No run is between its scoring and the ack of its last outcome: the state is one a replay from
    #: ``state.applied + 1`` continues exactly (a parked state, see Worker._drop).
    clean: bool = True


class Worker:
    """One cluster worker (see module docstring); ``start`` / ``stop`` on an asyncio loop."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        http_url: str = "",
        on_fatal: Callable[[str], None] = exit_process,
    ) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.metrics = metrics
        self.http_url = http_url
        self.id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")
        self.topology = Topology(
            settings.topic_readings, settings.topic_prefix, settings.partitions, settings.group
        )
        self.ttl = settings.lease_ttl_s
        ref = None if settings.model == DEFAULT_MODEL else settings.model
        self.model, self.model_version = load_default_or_builtin(ref, settings.models_dir, channels=1)
        self.config = scorer_config(settings)
        kernel.warm([(self.model, self.config)])
        metrics.set_model(*split_ref(self.model_version))
        self.parsing = ParseProcess(settings, on_death=self._parse_died)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Why this worker cannot score any more (the parse process died), or None.
        self.failure: str | None = None
        self.owned: dict[int, Owned] = {}
        #: KV key -> (value, operation, time.monotonic() when this revision was first seen, revision).
        self.view: dict[str, tuple[bytes, str, float, int]] = {}
        self.handoffs: list[dict[str, Any]] = []  # acquired / released / fenced / lost, with wall times
        if settings.torch_threads:
            kernel.set_threads(settings.torch_threads)
        self._scoring = ThreadPoolExecutor(
            1, thread_name_prefix="sensorwatch-score", initializer=self._scoring_thread_setup
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started_at = 0.0
        self._last_acquired = 0.0
        #: partition -> (a state dropped between runs, when): see _drop; kept PARKED_S at most.
        self._parked: dict[int, tuple[PartitionState, float]] = {}
        #: lease key -> (the leader's revision, when this worker first read it): see _claim.
        self._unchanged: dict[str, tuple[int, float]] = {}
        self.connected = False
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # As the single-node service does (service/runtime.py): the start-up heap out of the cyclic
        # GC's sight (every nats-py message is a few objects; a collection would traverse torch's).
        # The service's short GIL switch interval did not help here (gateway drains 98k vs 109k r/s).
        freeze_heap()
        self._loop = asyncio.get_running_loop()
        self.parsing.start()
        self.nc = await nats.connect(
            servers=self.settings.nats_servers,
            name=f"sensorwatch-{self.id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
        )
        self.connected = True
        self.js = self.nc.jetstream(timeout=5)
        await self._wait_assets()
        self._started_at = time.monotonic()
        for coro in (self._watch(), self._renew_loop(), self._balance_loop()):
            self._tasks.append(asyncio.create_task(coro))
        self.ready = True
        log.info(
            "cluster worker %s of group %s started: %d partitions (+1 unrouted), lease TTL %.1f s, model %s",
            self.id,
            self.settings.group,
            self.topology.partitions,
            self.ttl,
            self.model_version,
        )

    async def stop(self) -> None:
        """Graceful leave: stop balancing, release every partition (checkpointed; the leases are
        renewed meanwhile), withdraw from the group, close."""
        self._stopping = True
        self.ready = False
        balancer = self._tasks[-1]
        balancer.cancel()
        await asyncio.gather(balancer, return_exceptions=True)
        for p in sorted(self.owned):
            await self._release(p)
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5.0)
        try:
            await asyncio.wait_for(self.kv.delete(Topology.member_key(self.id)), 5.0)
        except Exception as exc:  # the key lapses by itself
            log.warning("could not withdraw from the group: %s", exc)
        # Every outcome was acked and every partition checkpointed: nothing is left to drain.
        await asyncio.wait([asyncio.create_task(self.nc.close())], timeout=5.0)
        self._scoring.shutdown(wait=False)
        self.parsing.stop()
        log.info("cluster worker %s left the group", self.id)

    def _scoring_thread_setup(self) -> None:
        """``TORCH_THREADS`` for the scoring thread, as the single-node engine does for its own
        (torch's OpenMP team is per calling thread). Measured without it: the forecaster's sequence
        forward ran on a team of both cores, whose extra thread spun against the event loop and the
        parse process, and cost ~8.8 µs per reading in a worker against ~1.2 µs alone."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)

    def _parse_died(self, why: str) -> None:  # from the parse process's receiving thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fatal, why)

    def _fatal(self, why: str) -> None:
        """The worker cannot score any more: not ready at once (``/readyz`` 503 with the cause), then,
        after WATCHDOG_EXIT_AFTER_S (time for a scrape), ``on_fatal`` — ``sensorwatch serve`` exits
        with status EXIT_FAILED for its supervisor to restart it. Its leases are not renewed from then
        on: the other workers take its partitions over once they lapse (exact, from the checkpoints
        and the stream), as after a kill -9."""
        if self.failure is not None:
            return
        self.failure, self.ready = why, False
        log.critical(
            "cluster worker %s cannot score: %s; exiting with status %d in %g s",
            self.id,
            why,
            EXIT_FAILED,
            WATCHDOG_EXIT_AFTER_S,
        )
        for task in self._tasks:  # no renewals, no balancing: the leases lapse
            task.cancel()
        asyncio.get_running_loop().call_later(WATCHDOG_EXIT_AFTER_S, self.on_fatal, why)

    async def _disconnected(self) -> None:
        self.connected = False
        log.warning("cluster worker %s: disconnected from NATS", self.id)

    async def _reconnected(self) -> None:
        self.connected = True
        log.info("cluster worker %s: reconnected to %s", self.id, self.nc.connected_url)

    async def _error(self, exc: Exception) -> None:
        log.debug("NATS client: %s", exc)

    async def _wait_assets(self, patience_s: float = 60.0) -> None:
        """:meth:`_ensure_assets`, again until JetStream answers (a cluster just started or one that
        lost a node has no leader for a few seconds)."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                await self._ensure_assets()
                await self._announce()
                return
            except nats.errors.Error as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("JetStream not ready (%s); trying again", type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _ensure_assets(self) -> None:
        """The streams and buckets, created by the first worker (R3 on a cluster of 3 or more)."""
        replicas = min(3, len(self.settings.nats_servers))
        version = server_version(self.nc.connected_server_version)
        if replicas > 1 and version < MIN_SERVER_VERSION:
            raise ClusterConfigError(
                f"nats-server {'.'.join(map(str, version))} does not serialise compare-and-set on "
                "replicated streams (fixed in 2.9.21, nats-server issue 4320): two workers could "
                "acquire one partition. Upgrade the NATS servers (docs/cluster.md)"
            )
        streams = (
            (READINGS_STREAM, self.topology.stream_subjects(), READINGS_MAX_AGE_S),
            (OUTPUTS_STREAM, self.topology.output_subjects(), OUTPUTS_MAX_AGE_S),
        )
        for name, subjects, max_age in streams:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                info = await self.js.add_stream(
                    name=name,
                    subjects=subjects,
                    num_replicas=replicas,
                    max_age=max_age,
                    duplicate_window=DUPLICATE_WINDOW_S,
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                )
            retention = getattr(info.config.retention, "value", info.config.retention)
            if name == READINGS_STREAM and retention != "limits":
                raise ClusterConfigError(
                    f"stream {name} has {retention} retention: the NATS servers created it when an MQTT "
                    "client connected before any worker; its PUBACKs do not keep readings. Delete it "
                    "while no MQTT client is connected and start the workers first (docs/cluster.md)"
                )
        t = self.topology
        try:
            self.kv = await self.js.key_value(t.leases_bucket)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await self.js.create_key_value(
                bucket=t.leases_bucket, ttl=self.ttl, history=1, replicas=replicas
            )
        status = await self.kv.status()
        if status.ttl is not None and not math.isclose(status.ttl, self.ttl, rel_tol=0.01):
            log.warning("lease bucket's TTL is %.1f s, not LEASE_TTL_S %.1f s", status.ttl, self.ttl)
            self.ttl = float(status.ttl)
        try:
            self.obs = await self.js.object_store(t.checkpoints_bucket)
        except nats.js.errors.BucketNotFoundError:
            self.obs = await self.js.create_object_store(t.checkpoints_bucket, replicas=replicas)

    # ------------------------------------------------------------------ membership and leases
    async def _announce(self) -> None:
        doc = {"http": self.http_url, "partitions": sorted(self.owned)}
        await self.kv.put(Topology.member_key(self.id), json.dumps(doc).encode())

    async def _announce_now(self) -> None:
        """Tell the others at once what this worker owns (they even out shares by it)."""
        try:
            await self._announce()
        except Exception as exc:  # the next renewal announces it
            log.debug("announce failed: %s", exc)

    async def _watch(self) -> None:
        """Keep :attr:`view` current. Our own announcement is rewritten every third of the TTL, so a
        whole TTL without any update means the watch broke (a NATS node died): start it again."""
        while not self._stopping:
            try:
                watcher = await self.kv.watchall()
                while True:
                    entry = await watcher.updates(timeout=self.ttl)
                    if entry is not None:
                        op = entry.operation or "PUT"
                        before = self.view.get(entry.key)
                        seen = before[2] if before and before[3] == entry.revision else time.monotonic()
                        self.view[entry.key] = (entry.value or b"", op, seen, entry.revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("lease watch restarted (%s)", type(exc).__name__)
                await asyncio.sleep(0.2)

    def members(self) -> list[str]:
        now = time.monotonic()
        live = {
            key[2:]
            for key, (_, op, seen, _) in self.view.items()
            if key.startswith("m.") and op == "PUT" and now - seen < self.ttl
        }
        return sorted(live | {self.id})

    def share(self) -> int:
        return math.ceil(len(self.topology.all_partitions) / len(self.members()))

    def _someone_short(self) -> bool:
        """A live member owns fewer than the floor of the fair share (by its last announcement):
        then whoever is above the floor gives one up, so shares end within one of each other."""
        members = self.members()
        floor = len(self.topology.all_partitions) // len(members)
        for member in members:
            if member == self.id:
                continue
            seen = self.view.get(Topology.member_key(member))
            try:
                owned = len(json.loads(seen[0])["partitions"]) if seen else 0
            except (ValueError, KeyError, TypeError):
                continue
            if owned < floor:
                return True
        return False

    def free_partitions(self) -> list[int]:
        """Partitions nobody holds as far as the watch shows (deleted, never taken, or not renewed for
        a TTL), best-suited to this worker first (rendezvous hashing: few moves when members change)."""
        now = time.monotonic()
        out = []
        for p in self.topology.all_partitions:
            if p in self.owned:
                continue
            seen = self.view.get(Topology.lease_key(p))
            if seen is None or seen[1] != "PUT" or now - seen[2] >= self.ttl:
                out.append(p)
        # Parked states first (no checkpoint to read), then by affinity.
        return sorted(out, key=lambda p: (p in self._parked, self._affinity(p)), reverse=True)

    def _affinity(self, p: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{self.id}/{p}".encode(), digest_size=8).digest(), "big")

    async def _renew_loop(self) -> None:
        """Every third of the TTL: announce, renew every owned lease, fence what could not be renewed."""
        while not self._stopping:
            try:
                await self._announce()
            except Exception as exc:
                log.debug("announce failed: %s", exc)
            await asyncio.gather(*(self._renew(p) for p in list(self.owned)))
            await self._fence()
            await asyncio.sleep(self.ttl / 3)

    async def _renew(self, p: int) -> None:
        owned = self.owned.get(p)
        if owned is None:
            return
        started = time.monotonic()
        key, me = Topology.lease_key(p), self.id.encode()
        try:
            owned.revision = await self.kv.update(key, me, last=owned.revision)
            owned.valid_until = started + self.ttl - FENCE_MARGIN_S
        except nats.js.errors.KeyWrongLastSequenceError:
            if not await self._still_ours(p, owned):
                await self._drop(p, "lost")
        except Exception as exc:  # no leader for the bucket just now: the fence decides
            log.info("lease of partition %d not renewed: %r", p, exc)

    async def _still_ours(self, p: int, owned: Owned) -> bool:
        """After a renewal refused for its revision: an earlier renewal of ours may have been stored
        with its ack lost (the bucket's leader died meanwhile). The lease is still ours when the key
        holds our id: adopt its revision (the fence deadline stays where it was)."""
        try:
            entry = await self.kv.get(Topology.lease_key(p))
        except Exception:
            return False
        if entry.value == self.id.encode() and entry.operation in (None, "PUT") and entry.revision:
            owned.revision = entry.revision
            return True
        return False

    async def _fence(self) -> None:
        now = time.monotonic()
        for p, owned in list(self.owned.items()):
            if now >= owned.valid_until:
                await self._drop(p, "fenced")
            elif owned.task is not None and owned.task.done() and not owned.stop.is_set():
                # A consumer that died of a bug: give the partition up (another worker, or this one
                # later, continues it from its checkpoint) rather than hold it unconsumed.
                exc = owned.task.exception() if not owned.task.cancelled() else None
                log.error("partition %d: its consumer stopped (%r); giving it up", p, exc)
                await self._drop(p, "failed")

    async def _balance_loop(self) -> None:
        while not self._stopping:
            try:
                await self._balance()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("balancing partitions failed")
            await asyncio.sleep(BALANCE_INTERVAL_S)

    async def _balance(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        for p in [p for p, (_, at) in self._parked.items() if now - at > PARKED_S]:
            del self._parked[p]  # another worker holds it by now: its state has moved on
        # Let the members announce themselves first: otherwise the first worker up takes everything.
        if time.monotonic() - self._started_at < self.ttl / 3 + BALANCE_INTERVAL_S:
            return
        share = self.share()
        floor = len(self.topology.all_partitions) // len(self.members())
        # Evening out waits two TTLs after an acquisition: the others' announcements are a TTL old,
        # and a member still restoring checkpoints would not take a released partition at once.
        settled = time.monotonic() - self._last_acquired > 2 * self.ttl
        if len(self.owned) > share or (settled and len(self.owned) > floor and self._someone_short()):
            worst = min(self.owned, key=self._affinity)
            await self._release(worst)
            return
        for p in self.free_partitions()[: share - len(self.owned)]:
            if self._stopping:
                return
            await self._acquire(p)

    # ------------------------------------------------------------------ handoff
    async def _acquire(self, p: int) -> None:
        started = time.monotonic()
        try:
            revision = await self._claim(p)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # someone holds it (the watch had not shown it yet) or just won it
        except Exception as exc:
            log.info("partition %d not acquired: %r", p, exc)
            return
        parked = self._parked.pop(p, None)
        state = parked[0] if parked is not None else self._new_state(p)
        owned = Owned(state, revision, started + self.ttl - FENCE_MARGIN_S)
        self.owned[p] = owned  # renewed from now on, while the checkpoint is read
        try:
            if parked is None:
                await asyncio.wait_for(self._restore(p, state), OBJECT_STORE_TIMEOUT_S)
        except Exception as exc:  # the object store unreachable: give the lease back, try again later
            log.warning("partition %d: checkpoint not read (%s); lease given back", p, exc)
            if self.owned.get(p) is owned:
                del self.owned[p]
                await self._delete_lease(p, owned.revision)
            return
        if self.owned.get(p) is not owned:
            return  # fenced or lost while restoring
        owned.checkpointed = state.applied if parked is None else -1
        owned.task = asyncio.create_task(self._consume(p, owned))
        self._last_acquired = time.monotonic()
        self._handoff("acquired", p, seq=state.applied, devices=len(state.scorer.store))
        await self._announce_now()

    async def _claim(self, p: int) -> int:
        """The lease of a free partition, by compare-and-set (see module docstring, step 3): ``create``
        when the key is gone; otherwise, once the revision the bucket's leader holds for it has stayed
        the same for the TTL plus the fence margin across this worker's own reads (its owner stopped
        renewing, and fenced itself by then), ``update`` against exactly that revision — it fails if
        anyone wrote the key since. The second way does not depend on the server expiring the key:
        after the bucket's leader died, lapsed keys stayed past their max age, and the watch showed
        an older revision than the leader held (a renewal stored with its reply lost)."""
        key, me = Topology.lease_key(p), self.id.encode()
        try:
            return await self.kv.create(key, me)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        revision = await self._leader_revision(key)
        now = time.monotonic()
        first = self._unchanged.get(key)
        if revision is None or first is None or first[0] != revision:
            self._unchanged[key] = (revision or 0, now)
            raise nats.js.errors.KeyWrongLastSequenceError
        if now - first[1] < self.ttl + FENCE_MARGIN_S:
            raise nats.js.errors.KeyWrongLastSequenceError
        log.info("partition %d: lease lapsed without expiring (revision %d); taking it over", p, revision)
        del self._unchanged[key]
        return await self.kv.update(key, me, last=revision)

    async def _leader_revision(self, key: str) -> int | None:
        """The key's revision as the bucket's leader has it (not a replica's direct answer)."""
        bucket = self.topology.leases_bucket
        try:
            msg = await self.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=False)
        except nats.js.errors.NotFoundError:
            return None
        if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return int(msg.seq) if msg.seq else None

    def _new_state(self, p: int) -> PartitionState:
        return PartitionState(
            p, self.topology, self.settings, self.model, self.config, self.model_version, self.metrics
        )

    async def _restore(self, p: int, state: PartitionState) -> None:
        try:
            found = await self.obs.get(Topology.checkpoint_name(p))
        except nats.js.errors.ObjectNotFoundError:
            return
        data = found.data or b""
        try:
            await asyncio.get_running_loop().run_in_executor(self._scoring, state.restore, data)
        except (StateIncompatibleError, CheckpointMismatch) as exc:
            log.warning(
                "partition %d: checkpoint not usable (%s); rebuilding its state from the stream", p, exc
            )

    async def _release(self, p: int) -> None:
        """Cooperative: stop after the run in hand, checkpoint, then delete the lease."""
        owned = self.owned.get(p)
        if owned is None:
            return
        owned.stop.set()
        if owned.task is not None:
            await asyncio.gather(owned.task, return_exceptions=True)
        if time.monotonic() < owned.valid_until:
            try:
                await self._checkpoint(p, owned)
            except Exception as exc:  # the next owner replays from the previous checkpoint: still exact
                log.warning("partition %d: checkpoint on release failed (%s)", p, exc)
            await self._delete_lease(p, owned.revision)
        del self.owned[p]
        self._handoff("released", p, seq=owned.state.applied)
        await self._announce_now()

    async def _drop(self, p: int, why: str) -> None:
        """Stop at once, without a checkpoint (the lease lapsed or is another's). A state dropped
        between runs is *parked*: it is as good as a checkpoint of ``state.applied`` (a replay from
        there is exact, whatever another owner did meanwhile), so re-acquiring the partition later
        continues from it without reading the object store — which stalled for seconds after a
        node's death, when every worker had fenced its partitions at once."""
        owned = self.owned.pop(p, None)
        if owned is None:
            return
        owned.stop.set()
        if owned.task is not None and owned.task is not asyncio.current_task():
            owned.task.cancel()  # it is suspended at an await: it never starts another run
        if owned.clean and why in ("fenced", "lost"):
            self._parked[p] = (owned.state, time.monotonic())
        self._handoff(why, p, seq=owned.state.applied)
        cause = "its lease is another worker's" if why == "lost" else "its lease could not be renewed in time"
        log.warning("partition %d %s: %s", p, why, cause)

    async def _delete_lease(self, p: int, revision: int) -> None:
        try:
            await self.kv.delete(Topology.lease_key(p), last=revision)
        except Exception as exc:  # it lapses by itself after the TTL
            log.info("lease of partition %d not deleted (%s); it lapses in %.0f s", p, exc, self.ttl)

    def _handoff(self, kind: str, p: int, **extra: Any) -> None:
        event = {"event": kind, "partition": p, "worker": self.id, "at": time.time(), **extra}
        self.handoffs.append(event)
        self.metrics.cluster_handoffs.labels(kind).inc()
        log.info("handoff %s", json.dumps(event))

    # ------------------------------------------------------------------ consuming
    async def _consume(self, p: int, owned: Owned) -> None:
        sub = None
        expected = 1
        idle_since = time.monotonic()
        while not owned.stop.is_set():
            if sub is None:
                sub = await self._subscribe(p, owned)
                expected = 1
                if sub is None:
                    await asyncio.sleep(0.25)
                    continue
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                idle_since = time.monotonic()
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []  # nothing new within FETCH_TIMEOUT_S
                if time.monotonic() - idle_since > IDLE_CHECK_S and not await self._consumer_alive(sub):
                    log.info("partition %d: consumer gone (its node died?); recreating it", p)
                    sub = await _unsubscribe(sub)
                    continue
                idle_since = time.monotonic() if time.monotonic() - idle_since > IDLE_CHECK_S else idle_since
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("partition %d: consumer lost (%s); recreating it", p, type(exc).__name__)
                sub = await _unsubscribe(sub)
                continue
            run, broken = self._run_of(msgs, owned, expected)
            expected += len(msgs)
            try:
                if run:
                    await self._apply(p, owned, run)
                if time.monotonic() - owned.checkpoint_at >= self.settings.checkpoint_interval_s:
                    await self._checkpoint_or_log(p, owned)
            except Fenced:
                return
            if broken:
                log.info(
                    "partition %d: a message was skipped; consuming again from %d", p, owned.state.applied
                )
                sub = await _unsubscribe(sub)
        await _unsubscribe(sub)

    @staticmethod
    async def _consumer_alive(sub: Any) -> bool:
        """An idle consumer still exists on the server: an ephemeral consumer lives on one node, and
        a fetch from one whose node died only ever times out."""
        try:
            await sub.consumer_info()
            return True
        except Exception:
            return False

    async def _subscribe(self, p: int, owned: Owned) -> Any:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=owned.state.applied + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=10.0,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            return await self.js.pull_subscribe(
                self.topology.filter_subject(p), stream=READINGS_STREAM, config=config
            )
        except Exception as exc:
            log.info("partition %d: consumer not created (%s)", p, type(exc).__name__)
            return None

    @staticmethod
    def _run_of(msgs: list[Any], owned: Owned, expected: int) -> tuple[list[StreamMessage], bool]:
        """The fetched messages after the last applied one, in order; ``broken``: the consumer's
        sequence jumped (a message was not delivered), so the rest waits for a new consumer."""
        run: list[StreamMessage] = []
        for msg in msgs:
            md = msg.metadata
            if md.sequence.consumer != expected:
                return run, True
            expected += 1
            owned.lag = int(md.num_pending)
            if md.sequence.stream > owned.state.applied:
                run.append(StreamMessage(md.sequence.stream, msg.subject, msg.data, md.timestamp.timestamp()))
        return run, False

    async def _apply(self, p: int, owned: Owned, run: list[StreamMessage]) -> None:
        outputs: list[tuple[str, bytes, str]] = []
        loop = asyncio.get_running_loop()
        try:
            parsed = await self.parsing.parse(owned.state.topics(run), [m.payload for m in run])
        except ParseProcessDied as exc:
            self._fatal(str(exc))
            raise
        owned.clean = False
        await loop.run_in_executor(
            self._scoring, owned.state.apply, run, parsed, lambda t, b, k: outputs.append((t, b, k))
        )
        await self._publish(p, owned, outputs)
        owned.clean = True

    async def _publish(self, p: int, owned: Owned, outputs: list[tuple[str, bytes, str]]) -> None:
        """Publish with JetStream acks, again until all are acked (the outputs stream dedupes by
        ``Nats-Msg-Id``) or the lease may have lapsed (:class:`Fenced`: the partition is dropped)."""
        pending = outputs
        while pending:
            if time.monotonic() >= owned.valid_until:
                await self._drop(p, "fenced")
                raise Fenced(p)
            # js.publish (a request with its own timeout), many at once: publish_async's futures of
            # acks lost with a dead node never resolve, and hold its pending slots until it blocks.
            acks: list[Any] = []
            for at in range(0, len(pending), PUBLISH_CONCURRENCY):
                chunk = pending[at : at + PUBLISH_CONCURRENCY]
                acks += await asyncio.gather(
                    *(
                        self.js.publish(
                            Topology.output_subject(topic), payload, timeout=5.0, headers={"Nats-Msg-Id": key}
                        )
                        for topic, payload, key in chunk
                    ),
                    return_exceptions=True,
                )
            pending = [o for o, ack in zip(pending, acks, strict=True) if isinstance(ack, BaseException)]
            if pending:
                await asyncio.sleep(0.1)

    async def _checkpoint_or_log(self, p: int, owned: Owned) -> None:
        """A periodic checkpoint; one that fails is tried again at the next interval (a takeover
        meanwhile replays from the previous one: longer, still exact)."""
        try:
            await self._checkpoint(p, owned)
        except Exception as exc:
            log.warning(
                "partition %d: checkpoint failed (%r); trying again in %.0f s",
                p,
                exc,
                self.settings.checkpoint_interval_s,
            )

    async def _checkpoint(self, p: int, owned: Owned) -> None:
        owned.checkpoint_at = time.monotonic()
        if owned.state.applied == owned.checkpointed:
            return
        started = time.monotonic()
        data = await asyncio.get_running_loop().run_in_executor(self._scoring, owned.state.checkpoint)
        seq = owned.state.applied
        # nats-py's object store waits without a deadline of its own (seen hanging after a node died).
        await asyncio.wait_for(self.obs.put(Topology.checkpoint_name(p), data), OBJECT_STORE_TIMEOUT_S)
        owned.checkpointed = seq
        self.metrics.cluster_checkpoints.inc()
        self.metrics.cluster_checkpoint_seconds.observe(time.monotonic() - started)

    # ------------------------------------------------------------------ inspection
    def describe(self) -> dict[str, Any]:
        return {
            "worker": self.id,
            "group": self.settings.group,
            "members": self.members(),
            "share": self.share(),
            "partitions": {
                str(p): {"applied": o.state.applied, "devices": len(o.state.scorer.store), "lag": o.lag}
                for p, o in sorted(self.owned.items())
            },
        }

    @property
    def lag(self) -> int:
        return sum(o.lag for o in self.owned.values())

    @property
    def devices(self) -> int:
        return sum(len(o.state.scorer.store) for o in self.owned.values())


async def _unsubscribe(sub: Any) -> Any:
    """Drop a consumer's subscription (the server deletes the ephemeral consumer after its inactive
    threshold anyway); returns None, the "no consumer" of :meth:`Worker._consume`."""
    if sub is not None:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # the connection is gone: so is the subscription
            log.debug("unsubscribe failed: %s", exc)
    return None
