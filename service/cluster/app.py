"""The HTTP face of a cluster worker: health, metrics, ownership, and REST readings routed into the
readings stream.

REST in cluster mode **routes**: ``POST /v1/score`` publishes each device's readings, in order, as one
message on ``sw.gw.<device>`` through JetStream (the server maps it to the device's partition of the
readings stream) and answers 202 once the stream acknowledged every message (stored on a majority of its
replicas). The owner of the partition scores them like MQTT readings; the outcomes appear on the
output subjects (``sensorwatch/scores/<device>`` with ``PUBLISH_SCORES``, anomalies, dead letters).
Answering for owned devices directly would score readings that are not in the stream, so a takeover
replaying the stream would build another state than the one that answered: the stream is the log,
and every reading goes through it. Dry runs are answered by single-node mode only (409 here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from starlette.routing import Route

from service.app import _AsgiEndpoint, _refusal, _score_readings  # the single-node parser and schema
from service.cluster.topology import READINGS_STREAM, Topology
from service.cluster.worker import Worker
from service.metrics import Metrics
from service.payloads import PayloadError, valid_device_id
from service.settings import Settings

log = logging.getLogger("sensorwatch.cluster")


def create_cluster_app(settings: Settings, http_url: str = "") -> FastAPI:
    metrics = Metrics(mqtt=False, cluster=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = Worker(settings, metrics, http_url)
        app.state.worker = worker
        metrics.cluster_partitions.set_function(lambda: float(len(worker.owned)))
        metrics.cluster_lag.set_function(lambda: float(worker.lag))
        metrics.cluster_members.set_function(lambda: float(len(worker.members())))
        metrics.active_devices.set_function(lambda: float(worker.devices))
        metrics.ready.set_function(lambda: 1.0 if worker.ready and worker.connected else 0.0)
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="sensorwatch (cluster worker)", version="0.1.0", lifespan=lifespan, docs_url=None)
    app.router.routes.append(
        Route("/metrics", endpoint=_AsgiEndpoint(make_asgi_app(registry=metrics.registry)))
    )

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> JSONResponse:
        """Connected to NATS and taking part in the group (503 otherwise, with ``failure`` once the
        worker cannot score and is about to exit)."""
        worker: Worker = request.app.state.worker
        ready = worker.ready and worker.connected
        body = {
            "ready": ready,
            "connected": worker.connected,
            "worker": worker.id,
            "owned": sorted(worker.owned),
            "failure": worker.failure,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/cluster", tags=["ops"])
    def cluster(request: Request) -> dict[str, Any]:
        """This worker's view: members, its share and partitions (applied sequence, devices, lag),
        and its latest ownership changes."""
        worker: Worker = request.app.state.worker
        return {**worker.describe(), "handoffs": worker.handoffs[-100:]}

    @app.post("/v1/score", tags=["scoring"], status_code=202)
    async def score(request: Request) -> JSONResponse:
        """Route readings into the readings stream (see module docstring); 202 once stored."""
        raw = await request.body()
        if len(raw) > settings.max_request_bytes:
            return _refusal(413, "payload_too_large", f"{len(raw)} bytes > {settings.max_request_bytes}")
        if request.query_params.get("dry_run", "false").lower() in ("1", "true", "yes"):
            return _refusal(409, "dry_run_unsupported", "cluster mode scores through the stream only")
        try:
            readings = await asyncio.get_running_loop().run_in_executor(None, _score_readings, raw)
        except PayloadError as exc:
            return _refusal(400, exc.reason, exc.detail)
        except RequestValidationError as exc:  # FastAPI's 422 shape
            detail = orjson.loads(orjson.dumps(exc.errors(), default=str))
            return JSONResponse({"detail": detail}, status_code=422)
        if len(readings) > settings.max_request_readings:
            return _refusal(413, "too_many_readings", f"{len(readings)} > {settings.max_request_readings}")
        by_device: dict[str, list[dict[str, Any]]] = {}
        for r in readings:
            by_device.setdefault(str(r.device_id), []).append({"ts": r.ts, "values": r.values})
        bad = [d for d in by_device if not valid_device_id(d) or "." in d]
        if bad:
            return _refusal(422, "bad_device_id", f"device ids not routable in cluster mode: {bad[:5]}")
        worker: Worker = request.app.state.worker
        stored = []
        for device, items in by_device.items():
            payload = orjson.dumps({"readings": items})
            ack = await worker.js.publish(Topology.gateway_subject(device), payload, stream=READINGS_STREAM)
            stored.append({"device_id": device, "stream_seq": ack.seq, "readings": len(items)})
        return JSONResponse({"routed": stored, "readings": len(readings)}, status_code=202)

    return app
