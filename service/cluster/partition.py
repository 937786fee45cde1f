"""One partition's devices in a worker: a scorer of their own, the last stream sequence applied to
them, and the checkpoint that hands them over.

The readings stream is the partition's log: the state after applying stream messages up to sequence
``S`` is a pure function of the checkpoint it started from and the messages after it, because
everything a step depends on comes from the stream — the readings, their order, and the scorer's
clock (the stream's own timestamp of the batch's last message, not this worker's wall clock). So a
checkpoint ``{S, state}`` restored anywhere and replayed from ``S + 1`` gives the same state, bit for bit,
as the worker that wrote it had (tests/cluster: equal to a single-process run).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sensorwatch.model.forecaster import Forecaster
from sensorwatch.scoring.batch import ReadingBatch, StepResult
from sensorwatch.scoring.config import ScorerConfig
from sensorwatch.scoring.scorer import StreamScorer
from sensorwatch.state.records import MessageMeta
from service.cluster.topology import Topology
from service.intake import ParsedMessage
from service.metrics import Metrics
from service.outcomes import Outcomes, Publish
from service.pipeline import Work, count_batch
from service.runtime import RecentDigests
from service.settings import Settings

log = logging.getLogger("sensorwatch.cluster")

#: Digests of the partition's latest messages, kept (and checkpointed) to recognise one a device sent
#: twice: an MQTT QoS1 publisher resends what it has no PUBACK for after a reconnect, and the server may
#: have stored the first copy already. The copy gets no outcome of its own (the first one has).
RECENT_DIGESTS = 4096


@dataclass(frozen=True)
class StreamMessage:
    """One stored reading message: its stream sequence, subject, payload and the stream's timestamp."""

    seq: int
    subject: str
    payload: bytes
    stamp: float  # seconds since the epoch, as the stream recorded it


class CheckpointMismatch(ValueError):
    """A checkpoint written for another partition layout (the partition count changed)."""


class PartitionState:
    """The devices of one partition (see module docstring)."""

    def __init__(
        self,
        index: int,
        topology: Topology,
        settings: Settings,
        model: Forecaster,
        config: ScorerConfig,
        model_version: str,
        metrics: Metrics,
    ) -> None:
        self.index = index
        self.topology = topology
        self._settings = settings
        self._clock = 0.0
        self.scorer = StreamScorer(model, config, model_version=model_version, clock=lambda: self._clock)
        self.metrics = metrics
        self.applied = 0  # the last stream sequence applied to this state
        self.recent = RecentDigests(RECENT_DIGESTS)
        self.duplicates = 0

    # ------------------------------------------------------------------ scoring
    def apply(self, messages: list[StreamMessage], parsed: list[ParsedMessage], publish: Publish) -> None:
        """Score a run of the partition's messages (in stream order, all after :attr:`applied`;
        ``parsed``: each as the MQTT intake parses it, see :meth:`topics`) as one step and hand every
        outcome to ``publish``; a message seen before gets none."""
        works: list[Work] = []
        kept: list[ParsedMessage] = []
        for msg in parsed:
            if msg.digest in self.recent:
                self.duplicates += 1
                continue
            self.recent.add(msg.digest)
            works.append(self._work(msg))
            kept.append(msg)
        self._clock = messages[-1].stamp
        parts = [(w.device_ids, w.ts, w.values) for w in works if w.device_ids]
        batch = ReadingBatch.from_parts(parts, self.scorer.channel_names)
        result = self._step(batch)
        count_batch(self.metrics, works, result)
        out = Outcomes(self._settings, publish)
        start = 0
        for work, msg in zip(works, kept, strict=True):
            meta = work.meta
            if meta.reason is not None:
                out.dead_letter(meta, msg.payload, msg.device, replayed=False)
            else:
                out.publish(meta, msg.payload, result, start, start + meta.readings, replayed=False)
            start += meta.readings
        self.applied = messages[-1].seq

    def topics(self, messages: list[StreamMessage]) -> list[str]:
        """The MQTT topics of the messages' subjects, which the parser reads the device id from."""
        topic = self.topology.mqtt_topic
        return [topic(m.subject) for m in messages]

    def _work(self, msg: ParsedMessage) -> Work:
        if msg.reason is not None or msg.device is None:
            reason = msg.reason or "bad_topic"  # the parser names every refusal; no device: the topic
            self.metrics.rejections.labels(reason).inc()
            self.metrics.readings.labels("nats", "rejected").inc()
            meta = MessageMeta("nats", msg.topic, msg.digest, 0, reason, msg.detail)
            return Work([], [], [], "nats", _nothing, meta)
        n = len(msg.ts)
        meta = MessageMeta("nats", msg.topic, msg.digest, n)
        return Work([msg.device] * n, msg.ts, msg.values, "nats", _nothing, meta)

    def _step(self, batch: ReadingBatch) -> StepResult | None:
        try:
            return self.scorer.step(batch)
        except Exception:  # every reading still gets an outcome (internal_error), on replay too
            log.exception("scoring a batch of partition %d failed", self.index)
            return None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> bytes:
        """``{applied, state}`` as one safetensors document (weights only, no pickle)."""
        extra = {
            "seq": self.applied,
            "partition": self.index,
            "partitions": self.topology.partitions,
            "recent": [d.hex() for d in self.recent.items()],
        }
        return self.scorer.capture(extra).to_bytes()

    def restore(self, data: bytes) -> None:
        """Continue from a checkpoint of this partition (:class:`CheckpointMismatch` if it is
        another layout's; ``StateIncompatibleError`` if another model's)."""
        name = f"checkpoint of partition {self.index}"
        tensors, metadata = self.scorer.store.read_snapshot_bytes(data, name)
        extra = json.loads(metadata.get("extra", "{}"))
        if extra.get("partitions") != self.topology.partitions or extra.get("partition") != self.index:
            raise CheckpointMismatch(
                f"{name} was written for partition {extra.get('partition')} of "
                f"{extra.get('partitions')}, not {self.index} of {self.topology.partitions}"
            )
        self.scorer.load_snapshot(tensors, metadata, name)
        self.applied = int(extra["seq"])
        for digest in extra.get("recent", []):
            self.recent.add(bytes.fromhex(digest))


def _nothing(*_: Any) -> None:
    """A cluster work's ``done``: its outcomes go out after the step, in :meth:`PartitionState.apply`."""
