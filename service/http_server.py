"""The HTTP server: uvicorn with its h11 protocol guarded against slow clients and connection floods.

What uvicorn (0.54) offers and why it is not enough on its own:

- ``timeout_keep_alive`` closes a connection idle *after a response*; a connection that sends half a
  request line (or half its headers, or half a body) and stalls is never timed out, and neither is one
  that opens and sends nothing.
- ``limit_concurrency`` answers 503 once a *complete* request head arrives beyond N; connections
  still sending their head hold a file descriptor each, uncounted, and the answer needs the head.
- ``h11_max_incomplete_event_size`` (16 KiB, kept) bounds the bytes of a head, not its duration.
- asyncio's accept loop takes up to ``backlog`` connections per event-loop pass before any protocol
  sees them; at the file-descriptor limit ``accept()`` fails with EMFILE, which asyncio logs with a
  traceback and then stops accepting for a second — ``/healthz`` included.

So :func:`serve` runs uvicorn's :class:`~uvicorn.server.Server` with

1. :class:`GuardedH11Protocol` (uvicorn's ``H11Protocol``, forced: behaviour does not depend on
   httptools being installed): a header timeout from the connection's start (or from the first byte
   of a keep-alive request), a body timeout between two chunks, and the connection cap
   (``http_max_connections``): at the cap a new connection closes the oldest connection that is waiting
   for a request head (a stalled or idle one; a real client's fresh connection is always newer), or,
   when every connection is mid-request, is answered 503 and closed;
2. listening sockets of its own (:class:`_GatedSocket`), whose ``accept()`` holds new connections in
   the kernel's queue (no descriptor spent) once the cap plus a small slack are open, so a burst can
   never run the process out of descriptors;
3. the soft RLIMIT_NOFILE raised to the hard limit at start, and the cap lowered (one log line) when
   even that leaves too few descriptors for it;
4. floods logged as one line per kind per 10 s, never a traceback per connection;
5. the app wrapped in :class:`_QuietDisconnect`: a request whose body timed out (or whose client
   left) ends, for the app, in ``http.disconnect``; Starlette's ``request.body()`` raises
   ``ClientDisconnect`` then, which uvicorn would log as an application error with a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import sys
from typing import Any, ClassVar, Literal

import h11
import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from service.settings import Settings

log = logging.getLogger("sensorwatch.http")

#: Descriptors kept for everything but HTTP connections, beyond those open when the server starts
#: (write-ahead log segments, snapshots, model files, the MQTT intake's pipes, thread pools).
RESERVED_FDS = 64
#: Connections accepted beyond the cap, so that one can still be taken in to close the oldest idle
#: connection (or to be answered 503) rather than wait in the kernel's queue.
ACCEPT_SLACK = 16
#: A flood's log lines: one per kind per this many seconds, with the count.
LOG_INTERVAL_S = 10.0


class _Tally:
    """Counts one kind of event and logs the count at most once per :data:`LOG_INTERVAL_S` (the first
    at once): 10,000 stalled connections give a line every 10 s, not 10,000 lines."""

    def __init__(self, level: int, message: str) -> None:
        self.level = level
        self.message = message
        self.count = 0
        self._handle: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop) -> None:
        self.count += 1
        if self._handle is None:
            self._report(loop, "")

    def flush(self) -> None:
        """Log what is counted and not yet said (at shutdown)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.count:
            log.log(self.level, "%s" + self.message, "since the last report: ", self.count)
            self.count = 0

    def _report(self, loop: asyncio.AbstractEventLoop, since: str) -> None:
        self._handle = None
        if self.count:
            log.log(self.level, "%s" + self.message, since, self.count)
            self.count = 0
            self._handle = loop.call_later(
                LOG_INTERVAL_S, self._report, loop, f"in the last {LOG_INTERVAL_S:g} s: "
            )


class Limits:
    """The limits and the shared state of one server's connections."""

    def __init__(self, header_timeout_s: float, body_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        #: accepted sockets not yet closed: the admitted plus those being evicted or refused
        self.max_sockets = max_connections + ACCEPT_SLACK
        self.sockets = 0
        self.admitted: set[GuardedH11Protocol] = set()
        #: admitted connections waiting for a request head, oldest first (a dict keeps the order)
        self.idle: dict[GuardedH11Protocol, None] = {}
        self.head_timeouts = _Tally(
            logging.INFO,
            f"%d HTTP connection(s) closed: no complete request head within {header_timeout_s:g} s "
            "(SENSORWATCH_HTTP_HEADER_TIMEOUT_S)",
        )
        self.body_timeouts = _Tally(
            logging.WARNING,
            f"%d HTTP request(s) answered 408: the body stalled over {body_timeout_s:g} s "
            "(SENSORWATCH_HTTP_BODY_TIMEOUT_S)",
        )
        self.evicted = _Tally(
            logging.WARNING,
            f"%d idle HTTP connection(s) closed to admit new ones: {max_connections} open "
            "(SENSORWATCH_HTTP_MAX_CONNECTIONS)",
        )
        self.refused = _Tally(
            logging.WARNING,
            f"%d HTTP connection(s) answered 503: {max_connections} open, all mid-request "
            "(SENSORWATCH_HTTP_MAX_CONNECTIONS)",
        )
        self.accept_failed = _Tally(
            logging.WARNING, "accept() failed %d time(s): out of file descriptors or memory; retrying"
        )

    @classmethod
    def for_settings(cls, settings: Settings) -> Limits:
        """The settings' limits, the cap lowered to what the descriptor limit allows (see :func:`fd_room`)."""
        wanted = settings.http_max_connections
        room = fd_room() - ACCEPT_SLACK
        cap = max(1, min(wanted, room))
        if cap < wanted:
            log.warning(
                "SENSORWATCH_HTTP_MAX_CONNECTIONS lowered from %d to %d: the file-descriptor limit "
                "(RLIMIT_NOFILE %d) leaves room for no more",
                wanted,
                cap,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
        return cls(settings.http_header_timeout_s, settings.http_body_timeout_s, cap)

    def tallies(self) -> list[_Tally]:
        return [self.head_timeouts, self.body_timeouts, self.evicted, self.refused, self.accept_failed]

    def make_room(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Close the oldest connection waiting for a request head; False when there is none."""
        victim = next(iter(self.idle), None)
        if victim is None:
            return False
        self.evicted.add(loop)
        victim.close_now()
        return True


def fd_room() -> int:
    """Descriptors HTTP connections may use: the soft limit, raised to the hard one, less those open
    now and :data:`RESERVED_FDS`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        for target in (hard, 1 << 20):  # an infinite hard limit: macOS refuses it as a soft one
            if target == resource.RLIM_INFINITY:
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
                break
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return int(soft) - _open_fds() - RESERVED_FDS


def _open_fds() -> int:
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(where)) - 1  # less the one listdir itself held
        except OSError:
            continue
    return 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a body timeout and the connection cap.

    Timers follow h11's view of the client (``conn.their_state``), re-read after every event:

    - IDLE (a request head not complete): the header timer runs from the connection's start, or from
      the first byte of a keep-alive request (before that byte uvicorn's keep-alive timeout applies).
      It is not restarted by more bytes: a head sent one byte a second still ends at the deadline.
    - SEND_BODY: the body timer restarts with every chunk.
    - DONE and after (the app has the request): none; the app's own time is not bounded here.
    """

    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for: Literal["head", "body"] | None = None
        self._admitted = False

    # --- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        lim = self.limits
        if len(lim.admitted) >= lim.max_connections and not lim.make_room(self.loop):
            lim.refused.add(self.loop)
            self._respond(503, b"Service Unavailable: too many connections\n", retry_after=True)
            _drop(transport)
            return
        lim.admitted.add(self)
        self._admitted = True
        self._sync()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._forget()
        self.limits.sockets = max(0, self.limits.sockets - 1)

    # --- uvicorn ------------------------------------------------------------------------------------
    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()  # a keep-alive connection is idle again (or has a pipelined request)

    def close_now(self) -> None:
        """Close without an answer (evicted, or a timeout already answered)."""
        self._forget()
        _drop(self.transport)

    # --- timers -------------------------------------------------------------------------------------
    def _sync(self) -> None:
        lim = self.limits
        if not self._admitted:
            return
        if self.transport.is_closing():
            self._forget()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            lim.idle.setdefault(self, None)  # keeps its place: the oldest is evicted first
            started = self.cycle is None or bool(self.conn.trailing_data[0])
            if started and self._timer_for != "head":
                self._arm("head", lim.header_timeout_s)
        elif state is h11.SEND_BODY:
            lim.idle.pop(self, None)
            self._arm("body", lim.body_timeout_s)
        else:
            lim.idle.pop(self, None)
            self._cancel()

    def _arm(self, kind: Literal["head", "body"], delay: float) -> None:
        self._cancel()
        handler = self._head_timeout if kind == "head" else self._body_timeout
        self._timer = self.loop.call_later(delay, handler)
        self._timer_for = kind

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_for = None

    def _forget(self) -> None:
        self._cancel()
        self._admitted = False
        self.limits.admitted.discard(self)
        self.limits.idle.pop(self, None)

    def _head_timeout(self) -> None:
        self._timer = self._timer_for = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.limits.head_timeouts.add(self.loop)
        if self.conn.trailing_data[0]:  # part of a head came: say why (nothing came: just close)
            self._respond(408, b"Request Timeout: request head not complete in time\n")
        self.close_now()

    def _body_timeout(self) -> None:
        """408 and close, unless the stall is ours, which restarts the timer:

        1. reading is paused (uvicorn buffered 64 KiB the app has not taken yet);
        2. the client waits for ``100 Continue``, which uvicorn sends once the app asks for the body.
        """
        self._timer = self._timer_for = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._arm("body", self.limits.body_timeout_s)
            return
        self.limits.body_timeouts.add(self.loop)
        if self.conn.our_state is h11.SEND_RESPONSE:  # the app has not started its answer
            self._respond(408, b"Request Timeout: request body stalled\n")
        if cycle is not None:
            # The app's receive() returns http.disconnect, its send() is dropped: as if the client left.
            cycle.disconnected = True
            cycle.message_event.set()
        self.close_now()

    def _respond(self, status: int, body: bytes, retry_after: bool = False) -> None:
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if retry_after:
            headers.append((b"retry-after", b"1"))
        try:
            head = h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status])
            out = b"".join(self.conn.send(e) or b"" for e in (head, h11.Data(data=body), h11.EndOfMessage()))
        except h11.LocalProtocolError:  # h11 cannot answer in this state: just close
            return
        self.transport.write(out)


def _drop(transport: asyncio.BaseTransport) -> None:
    """Close; abort when output is still queued (a client that does not read would otherwise keep the
    descriptor until it does)."""
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() > 0:
        transport.abort()
    else:
        transport.close()


def protocol_for(limits: Limits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection (``Config(http=...)``), bound to ``limits``."""

    class Bound(GuardedH11Protocol):
        pass

    Bound.limits = limits
    return Bound


class _GatedSocket(socket.socket):
    """A listening socket whose ``accept()`` reports "nothing to accept" while ``limits.max_sockets``
    are open: asyncio's accept loop then stops for this pass, and new connections wait in the kernel's
    queue (no descriptor) until one closes. It only blocks for the few loop passes it takes to close the
    connections accepted beyond the cap (evicting or refusing closes at once)."""

    limits: Limits

    def accept(self) -> tuple[socket.socket, Any]:
        if self.limits.sockets >= self.limits.max_sockets:
            raise BlockingIOError(errno.EAGAIN, "HTTP connection limit")
        conn, addr = super().accept()
        self.limits.sockets += 1
        return conn, addr


def listen(host: str, port: int, limits: Limits) -> list[socket.socket]:
    """Bound sockets for ``host`` (every address it resolves to, as asyncio's ``create_server``)."""
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, type_, proto, addr in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            sock = _GatedSocket(family, type_, proto)
            socks.append(sock)
            sock.limits = limits
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # one port for all addresses
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
    except OSError:
        for bound in socks:
            bound.close()
        raise
    return socks


class _QuietDisconnect:
    """Ends a request quietly when the app lets ``ClientDisconnect`` out after its client is gone
    (receive() said ``http.disconnect``): nobody is left to answer. Raised otherwise, it stays an error."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = False

        async def watched() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, watched, send)
        except ClientDisconnect:
            if not gone:
                raise


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        default = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            # The one error of asyncio's accept loop a flood can cause (with the gate, only when the
            # rest of the process takes the descriptors): one line per 10 s instead of a traceback a second.
            exc = context.get("exception")
            if (
                isinstance(exc, OSError)
                and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
                and "accept" in str(context.get("message", ""))
            ):
                limits = protocol_limits(self.config)
                if limits is not None:
                    limits.accept_failed.add(loop)
                    return
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn logs this line only for sockets it bound itself
            for sock in sockets:
                name = sock.getsockname()
                fmt = "[%s]:%d" if sock.family == socket.AF_INET6 else "%s:%d"
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://" + fmt + " (Press CTRL+C to quit)", name[0], name[1]
                )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        limits = protocol_limits(self.config)
        for tally in limits.tallies() if limits is not None else []:
            tally.flush()
        await super().shutdown(sockets)


def protocol_limits(config: uvicorn.Config) -> Limits | None:
    cls = getattr(config, "http_protocol_class", None)
    return getattr(cls, "limits", None)


def serve(app: Any, settings: Settings, host: str, port: int) -> int:
    """Run the app until SIGTERM/SIGINT (uvicorn's graceful shutdown); the exit status."""
    limits = Limits.for_settings(settings)
    try:
        sockets = listen(host, port, limits)
    except OSError as exc:
        print(f"sensorwatch: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        _QuietDisconnect(app),
        host=host,
        port=port,
        http=protocol_for(limits),
        ws="none",  # no WebSocket routes; an upgrade would hand the connection out of the cap's count
        log_level="info",
        timeout_graceful_shutdown=30,
    )
    server = _Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else 3  # 3: uvicorn's STARTUP_FAILURE (the lifespan failed)
