"""FastAPI app: thin routes over :class:`~service.runtime.Service` (the lifespan owns it)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from sensorwatch.artifacts import (
    BUILTIN_NAME,
    DEFAULT_MODEL,
    ArtifactError,
    ModelNotFound,
    list_models,
    load_model,
)
from sensorwatch.scoring.batch import Reading, StepResult
from sensorwatch.state.records import MessageMeta
from service.metrics import Metrics
from service.payloads import PayloadError, loads_payload, result_records
from service.pipeline import QueueFull, Work
from service.runtime import Service
from service.schemas import Detail, DeviceInfo, Refusal, ReloadRequest, ScoreRequest, ScoreResponse
from service.settings import Settings, SettingsError

log = logging.getLogger("sensorwatch.service")

#: How long a REST request waits for room in a full intake queue before a 503.
SUBMIT_TIMEOUT_S = 2.0
#: How long a REST request waits for its results (then a 504 that says they are being scored).
RESULT_TIMEOUT_S = 30.0
#: Dry runs scoring at once. Each scores a copy outside the batcher, sharing the GIL with live scoring:
#: six at once stalled live callers for seconds before this bound (issue #13).
DRY_RUN_CONCURRENCY = 2
#: A REST body over this many bytes (~100 readings) is parsed, submitted, scored as a dry run and
#: answered on a pool of its own (HEAVY_THREADS threads), not on the loop's default executor: eight
#: 10,000-reading requests had all six default threads busy parsing and answering, and a one-reading
#: caller's parse queued behind them (p99 up to 1.27 s in test_fairness; measured 2026-12-03).
HEAVY_BODY_BYTES = 8192
HEAVY_THREADS = 2


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]


#: Answers documented in OpenAPI beside FastAPI's own (a contract fuzzer checks every status code).
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "Admin token missing or wrong (WWW-Authenticate: Bearer)."}
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Detail, "description": "No state for this device."}
}

#: Where /docs takes Swagger UI's JavaScript, CSS and icon from (the fastapi-offline package's).
DOCS_ASSETS = "/docs-assets"


def _offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI served from the installed ``fastapi_offline`` package (Swagger UI 5)
    instead of a CDN: plants, ships and labs are often offline, and the CDN page was blank there. Not
    swagger-ui-bundle: its Swagger UI 4.15 cannot read the OpenAPI 3.1 FastAPI writes — the page
    said "Unable to render this definition" (found by the headless-browser test)."""
    from pathlib import Path

    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )


def create_app(
    settings: Settings,
    *,
    insecure_no_auth: bool = False,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; refuses (``SettingsError``) to exist without an admin token unless told it may.
    ``on_fatal``: what the service's watchdog does once it cannot score (``sensorwatch serve`` exits
    the process; see :meth:`Service._watch`)."""
    if settings.admin_token is None and not insecure_no_auth:
        raise SettingsError(
            "invalid setting SENSORWATCH_ADMIN_TOKEN: required for the admin endpoints "
            "(or start with --insecure-no-auth)"
        )
    _check_model(settings)

    metrics = Metrics(mqtt=bool(settings.mqtt_url))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_token is None:
            log.warning(
                "--insecure-no-auth: the admin endpoints (model reload, device reset) accept requests "
                "from anyone who can reach this port"
            )
        service = Service(settings, metrics, on_fatal=on_fatal)
        app.state.service = service
        service.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)
            heavy_pool.shutdown(wait=False)

    app = FastAPI(
        title="sensorwatch",
        version="0.1.0",
        description="Real-time sensor anomaly detection: per-device streaming recurrent state.",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets (the default loads them from a CDN)
        redoc_url=None,  # ReDoc has no vendored bundle: /docs is the API's page
    )
    _offline_docs(app)
    _document_score_body(app)

    def rest_rejection(reason: str, count: int = 1) -> None:
        """A REST request refused before its readings could be parsed or queued: counted like an MQTT
        message refused whole (once per request when the readings are unknown)."""
        metrics.readings.labels("rest", "rejected").inc(count)
        metrics.rejections.labels(reason).inc(count)

    def body_too_large(path: str) -> None:
        if path == "/v1/score":
            rest_rejection("payload_too_large")

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, on_reject=body_too_large)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """A 405's ``Allow`` lists the methods of every route of the path: Starlette's lists only the
        first route's (``/v1/devices/{id}`` is two routes, GET and DELETE)."""
        if exc.status_code == 405:
            allowed = sorted(
                {
                    m
                    for r in app.router.routes
                    if isinstance(r, Route) and r.matches(request.scope)[0] != Match.NONE
                    for m in (r.methods or ())
                }
            )
            return JSONResponse(
                {"detail": exc.detail}, status_code=405, headers={"Allow": ", ".join(allowed)}
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def count_bad_payloads(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path == "/v1/score":  # a body that is JSON but not a ScoreRequest
            rest_rejection("bad_payload")
        return await request_validation_exception_handler(request, exc)

    # The prometheus_client ASGI app, routed at exactly /metrics (a Mount would redirect to /metrics/).
    app.router.routes.append(
        Route("/metrics", endpoint=_AsgiEndpoint(make_asgi_app(registry=metrics.registry)))
    )

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        token = settings.admin_token
        if token is None:
            return  # --insecure-no-auth
        # Byte for byte, in constant time: the header exactly "Bearer <token>" (HTTP headers arrive as
        # latin-1 text, so this is the bytes on the wire); nothing is stripped or normalised.
        given = authorization.encode("latin-1", "replace") if authorization else b""
        if not hmac.compare_digest(given, b"Bearer " + token.get_secret_value().encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "admin token required", headers={"WWW-Authenticate": "Bearer"}
            )

    Admin = Depends(require_admin)

    dry_runs = asyncio.Semaphore(DRY_RUN_CONCURRENCY)
    heavy_pool = ThreadPoolExecutor(HEAVY_THREADS, thread_name_prefix="rest-heavy")

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        tags=["scoring"],
        responses={
            400: {
                "model": Refusal,
                "description": "Not JSON (malformed, nested too deep, a number no float holds).",
            },
            413: {
                "model": Refusal,
                "description": "Body over max_request_bytes or readings over max_request_readings.",
            },
            503: {
                "model": Refusal,
                "description": "Intake queue full or dry runs at their limit (retry after Retry-After), "
                "or the service failed (it restarts).",
            },
            504: {
                "model": Refusal,
                "description": "Queued and being scored, but not answered in time: do not resend.",
            },
        },
    )
    async def score(
        request: Request,
        svc: ServiceDep,
        dry_run: Annotated[bool, Query(description="Score against a copy; state does not advance.")] = False,
    ) -> Response:
        """Score readings through the same path as MQTT: one result or rejection per reading, in order.

        The body (a :class:`ScoreRequest`, see the schema) is read here and parsed off the event loop:
        FastAPI parses a declared body on the loop, and a 10,000-reading body held it ~0.15 s — eight
        such requests at once stalled every other caller for over a second (measured). The answer is
        built off the loop too, for the same reason."""
        raw = await request.body()
        loop = asyncio.get_running_loop()
        pool = heavy_pool if len(raw) > HEAVY_BODY_BYTES else None
        try:
            readings = await loop.run_in_executor(pool, _score_readings, raw)
        except PayloadError as exc:
            rest_rejection(exc.reason)
            return _refusal(400, exc.reason, exc.detail)
        if len(readings) > settings.max_request_readings:
            rest_rejection("too_many_readings", len(readings))
            return _refusal(
                413,
                "too_many_readings",
                f"{len(readings)} readings > max_request_readings {settings.max_request_readings}",
            )
        if dry_run:
            return await _dry_run(readings, svc, loop, pool)
        done: asyncio.Future[tuple[StepResult | None, int, int]] = loop.create_future()

        def finish(result: StepResult | None, start: int, stop: int) -> None:
            loop.call_soon_threadsafe(_set, done, (result, start, stop))

        work = Work(
            [r.device_id for r in readings],
            [r.ts for r in readings],
            [r.values for r in readings],
            "rest",
            finish,
            MessageMeta("rest", "", b"", len(readings)),
        )
        try:
            await loop.run_in_executor(pool, svc.submit_rest, work, SUBMIT_TIMEOUT_S)
        except QueueFull as exc:
            rest_rejection("queue_full", len(readings))
            return _refusal(503, "queue_full", str(exc), retry_after=True)
        try:
            # shield: a timeout must not cancel the future the output stage will still complete.
            outcome = await asyncio.wait_for(asyncio.shield(done), RESULT_TIMEOUT_S)
        except TimeoutError:
            if svc.failure is not None:  # the batcher may have died holding them: nobody knows
                return _refusal(
                    503,
                    "service_failed",
                    f"the service failed ({svc.failure}) and restarts; whether these readings were "
                    "scored is known after the restart: read GET /v1/devices/{id}",
                )
            # The readings are queued: they will be scored and the state will advance. Saying so is
            # the only honest answer — a resend would be refused (duplicate_timestamp / out_of_order).
            log.warning(
                "REST request of %d readings not answered within %.1f s", len(readings), RESULT_TIMEOUT_S
            )
            return _refusal(
                504,
                "result_timeout",
                f"queued and being scored, but not answered within {RESULT_TIMEOUT_S:g} s; the readings "
                "will be scored (state advances): do not resend them, read GET /v1/devices/{id}",
            )
        result, start, stop = outcome
        if result is None:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "scoring failed; nothing was scored")
        body = await loop.run_in_executor(pool, _answer, result, start, stop, False)
        return Response(body, media_type="application/json")

    async def _dry_run(
        readings: list[Reading],
        svc: Service,
        loop: asyncio.AbstractEventLoop,
        pool: ThreadPoolExecutor | None,
    ) -> Response:
        """At most DRY_RUN_CONCURRENCY dry runs score at once (each on a copy, outside the batcher):
        more would share the GIL with live scoring; a caller waits up to SUBMIT_TIMEOUT_S for a turn."""
        try:
            await asyncio.wait_for(dry_runs.acquire(), SUBMIT_TIMEOUT_S)
        except TimeoutError:
            rest_rejection("queue_full", len(readings))
            return _refusal(
                503, "queue_full", f"{DRY_RUN_CONCURRENCY} dry runs already running", retry_after=True
            )
        try:
            preview = await loop.run_in_executor(pool, svc.engine.dry_run, readings)
            body = await loop.run_in_executor(pool, _answer, preview, 0, len(readings), True)
        finally:
            dry_runs.release()
        return Response(body, media_type="application/json")

    @app.get("/v1/devices/{device_id}", response_model=DeviceInfo, tags=["devices"], responses=NOT_FOUND)
    def device(device_id: str, svc: ServiceDep) -> dict[str, Any]:
        """What the scorer knows of a device: readings, last timestamp, warm-up, recent likelihood."""
        with svc.engine.lock:
            info = svc.engine.scorer.device_info(device_id)
        if info is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no state for device {device_id!r}")
        return info

    @app.delete(
        "/v1/devices/{device_id}",
        status_code=204,
        dependencies=[Admin],
        tags=["devices"],
        responses={**UNAUTHORIZED, **NOT_FOUND},
    )
    def reset_device(device_id: str, svc: ServiceDep) -> Response:
        """Forget a device's state (admin): its next reading starts fresh with warm-up."""
        known = svc.reset_device(device_id)
        if not known:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no state for device {device_id!r}")
        return Response(status_code=204)

    @app.get("/v1/models", tags=["models"])
    def models(svc: ServiceDep) -> dict[str, Any]:
        """The active model (name, version, cell, channels, sha256) and the artifacts available."""
        return {"active": svc.engine.describe(), "available": list_models(settings.models_dir)}

    @app.post(
        "/v1/models/reload",
        dependencies=[Admin],
        tags=["models"],
        responses={
            400: {"model": Detail, "description": "The body is not JSON."},
            **UNAUTHORIZED,
            404: {"model": Detail, "description": "No such model or version."},
        },
    )
    async def reload(body: ReloadRequest, svc: ServiceDep) -> Any:
        """Validate an artifact and swap it in between batches (admin). Device state is kept when the
        architecture matches, else reset with warm-up. A bad artifact is refused (422, in the shape of
        any validation error, on the ``model`` field); the old model serves on."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, svc.engine.reload, body.model)
        except ModelNotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"model not loaded: {exc}") from None
        except ArtifactError as exc:
            error = {"type": "model_not_loaded", "loc": ["body", "model"], "msg": f"model not loaded: {exc}"}
            return JSONResponse({"detail": [error]}, status_code=422)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(svc: ServiceDep) -> JSONResponse:
        """Model loaded and MQTT connected (503 otherwise)."""
        h = svc.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    return app


class _AsgiEndpoint:
    """Starlette treats a plain function endpoint as request→response; an object is called as ASGI."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _check_model(settings: Settings) -> None:
    """A MODEL naming no loadable artifact refuses to start like any invalid setting (the lifespan
    would fail later with a traceback); the default falls back to the built-in model instead."""
    if settings.model in (DEFAULT_MODEL, BUILTIN_NAME):
        return
    try:
        load_model(settings.model, settings.models_dir)
    except ArtifactError as exc:
        detail = " ".join(str(exc).split())
        raise SettingsError(f"invalid setting SENSORWATCH_MODEL: {detail}") from None


def _score_readings(raw: bytes) -> list[Reading]:
    """The readings of a ``/v1/score`` body, in order. The JSON is read by the MQTT intake's parser
    (the same refusals: malformed_json, too_deep, number_out_of_range — a :class:`PayloadError`), then
    validated as a :class:`ScoreRequest` (a :class:`RequestValidationError`: FastAPI's 422)."""
    doc = loads_payload(raw)
    try:
        body = ScoreRequest.model_validate(doc)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=doc) from None
    return [Reading(g.device_id, r.ts, r.values) for g in body.groups() for r in g.readings]


def _answer(result: StepResult, start: int, stop: int, dry_run: bool) -> bytes:
    """The JSON answer (a :class:`ScoreResponse`), written by orjson: FastAPI's response_model path
    validates and encodes 10,000 results in ~0.3 s of the GIL."""
    return orjson.dumps({"results": result_records(result, start, stop), "dry_run": dry_run})


def _refusal(code: int, reason: str, detail: str, *, retry_after: bool = False) -> JSONResponse:
    headers = {"Retry-After": "1"} if retry_after else None
    return JSONResponse({"detail": detail, "reason": reason}, status_code=code, headers=headers)


def _document_score_body(app: FastAPI) -> None:
    """``/v1/score`` reads its body itself (see the route): its request body is put back into the
    OpenAPI document as the :class:`ScoreRequest` schema, with the models it refers to."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, defs = models_json_schema(
                [(ScoreRequest, "validation")], ref_template="#/components/schemas/{model}"
            )
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            doc["paths"]["/v1/score"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 — by Content-Length, or while streaming."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        max_bytes: int,
        on_reject: Callable[[str], None] = lambda path: None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            self.on_reject(scope.get("path", ""))
            await _too_large(send, self.max_bytes)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                # Counted here: FastAPI usually answers the 413 itself (the exception never gets back).
                self.on_reject(scope.get("path", ""))
                raise _BodyTooLarge(self.max_bytes)
            return msg

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(HTTPException):
    """Raised while the body streams in. An HTTPException, because FastAPI turns any other exception
    raised while reading the body into a 400; this way its exception handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail":"request body over {limit} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
