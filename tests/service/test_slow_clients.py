"""Slow clients and floods (issue #13 item 4): header and body timeouts and the connection cap of the
real server (``sensorwatch serve``: uvicorn with :mod:`service.http_server`), under a low
file-descriptor limit (soft = hard = 256, set in the child before it starts).

Without the protection each check fails: stock uvicorn never closes a connection that stalls in its
head or body, and 300 such connections exhaust 256 descriptors (EMFILE tracebacks from asyncio's
accept loop, ``/healthz`` unreachable)."""

from __future__ import annotations

import functools
import logging
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import httpx
import pytest

from service import http_server
from service.settings import load_settings
from tests.e2e.procs import ServiceProcess

FD_LIMIT = 256
HEADER_S = 1.0
BODY_S = 1.0
MAX_CONNECTIONS = 100
FLOOD = 300
#: How late a timeout may act on this shared 2-core machine.
SLACK_S = 1.0

ENV = {
    "SENSORWATCH_MQTT_URL": "",  # REST only: no broker
    "SENSORWATCH_MODEL": "builtin",
    "SENSORWATCH_HTTP_HEADER_TIMEOUT_S": str(HEADER_S),
    "SENSORWATCH_HTTP_BODY_TIMEOUT_S": str(BODY_S),
    "SENSORWATCH_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}
POST_HEAD = (
    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class LimitedService(ServiceProcess):
    """:class:`ServiceProcess` whose child runs with RLIMIT_NOFILE soft = hard = :data:`FD_LIMIT`."""

    def start(self) -> None:
        popen = subprocess.Popen
        with mock.patch.object(subprocess, "Popen", functools.partial(popen, preexec_fn=_limit_fds)):
            super().start()


def _open(port: int, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if first:
        sock.sendall(first)
    return sock


def _until_closed(socks: list[socket.socket], deadline: float) -> dict[int, tuple[float, bytes]]:
    """For each socket the server closed before ``deadline``: (monotonic time of the close, what it
    sent first). Sockets still open at the deadline are absent."""
    sel = selectors.DefaultSelector()
    got: dict[int, bytearray] = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        got[i] = bytearray()
    closed: dict[int, tuple[float, bytes]] = {}
    while len(closed) < len(socks):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            i = key.data
            try:
                chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
            except ConnectionResetError:
                chunk = b""
            if chunk:
                got[i] += chunk
                continue
            closed[i] = (time.monotonic(), bytes(got[i]))
            sel.unregister(key.fileobj)
    sel.close()
    return closed


def _still_open(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has neither closed nor answered (a zero-timeout poll)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    ready = len(sel.select(0))
    sel.close()
    return len(socks) - ready


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[LimitedService]:
    env = {**ENV, "SENSORWATCH_STATE_DIR": str(tmp_path / "state")}
    with LimitedService(env, tmp_path / "logs") as s:
        s.start()
        s.wait_ready(60)
        yield s


def test_floods_and_stalls_are_cut_and_health_stays_reachable(svc: LimitedService) -> None:
    # 1. 300 connections that send half a request line and stall: at the cap each new one closes the
    #    oldest, /healthz still gets in at once, the last 100 are closed with 408 at the header timeout.
    flood: list[socket.socket] = []
    opened: list[float] = []
    for _ in range(FLOOD):
        flood.append(_open(svc.port, b"GET /healthz HT"))
        opened.append(time.monotonic())
    t = time.monotonic()
    r = httpx.get(f"{svc.url}/healthz", timeout=5)
    health_s = time.monotonic() - t
    waiting = _still_open(flood)
    assert r.status_code == 200
    assert health_s < 1.0, f"/healthz took {health_s:.3f} s under the flood"
    assert waiting >= MAX_CONNECTIONS // 2, f"only {waiting} stalled connections open while /healthz answered"

    closed = _until_closed(flood, opened[-1] + HEADER_S + SLACK_S + 1)
    assert len(closed) == FLOOD, f"{FLOOD - len(closed)} stalled connections still open"
    lifetimes = {i: at - opened[i] for i, (at, _) in closed.items()}
    timed_out = [i for i, (_, data) in closed.items() if data]
    assert all(closed[i][1].startswith(b"HTTP/1.1 408 ") for i in timed_out)
    assert len(timed_out) >= MAX_CONNECTIONS // 2  # the last ones, closed by the timeout, not evicted
    assert all(HEADER_S - 0.1 <= lifetimes[i] <= HEADER_S + SLACK_S for i in timed_out)
    evicted = [i for i in closed if i not in timed_out]
    assert all(lifetimes[i] < HEADER_S for i in evicted)  # closed at once, without an answer
    print(
        f"\n/healthz under the flood: {health_s * 1000:.1f} ms, {waiting} stalled connections open; "
        f"{len(evicted)} evicted (lived ≤ {max(lifetimes[i] for i in evicted):.3f} s), "
        f"{len(timed_out)} closed with 408 after "
        f"{min(lifetimes[i] for i in timed_out):.3f}-{max(lifetimes[i] for i in timed_out):.3f} s"
    )
    for s in flood:
        s.close()

    # 2. A head sent one byte at a time is not a way around the header timeout.
    slow = _open(svc.port, b"")
    start = time.monotonic()
    sent = b""
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            slow.sendall(bytes([byte]))
            sent += bytes([byte])
            time.sleep(0.1)
            if time.monotonic() - start > HEADER_S + SLACK_S:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    slow_closed = _until_closed([slow], start + HEADER_S + SLACK_S)
    assert 0 in slow_closed, "a head trickled byte by byte was never cut"
    slow_s = slow_closed[0][0] - start
    assert HEADER_S - 0.1 <= slow_s <= HEADER_S + SLACK_S
    slow.close()

    # 2b. So is a keep-alive connection: after a response, half of the next head is cut like the first.
    kept = _open(svc.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += kept.recv(4096)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(0.5)  # idle within uvicorn's keep-alive timeout (5 s)
    kept.sendall(b"GET /heal")
    start = time.monotonic()
    kept_closed = _until_closed([kept], start + HEADER_S + SLACK_S)
    assert 0 in kept_closed, "half a keep-alive request was never cut"
    assert kept_closed[0][1].startswith(b"HTTP/1.1 408 ")
    kept_s = kept_closed[0][0] - start
    assert HEADER_S - 0.1 <= kept_s <= HEADER_S + SLACK_S
    kept.close()

    # 3. 100 requests whose bodies stall fill the cap (mid-request: none is evicted): a new connection
    #    gets 503; each stalled body gets 408 at the body timeout and is closed.
    bodies = []
    sent_at = []
    for _ in range(MAX_CONNECTIONS):
        bodies.append(_open(svc.port, POST_HEAD + b'{"device_id": "d1", '))
        sent_at.append(time.monotonic())
    time.sleep(0.3)  # every head read (each connection is mid-request) before the next connects
    extra = _open(svc.port, b"")
    refused = _until_closed([extra], time.monotonic() + 5)
    assert 0 in refused
    assert refused[0][1].startswith(b"HTTP/1.1 503 "), refused
    extra.close()
    closed = _until_closed(bodies, sent_at[-1] + BODY_S + SLACK_S + 1)
    assert len(closed) == MAX_CONNECTIONS, f"{MAX_CONNECTIONS - len(closed)} stalled bodies still open"
    assert all(data.startswith(b"HTTP/1.1 408 ") for _, data in closed.values())
    body_lifetimes = [at - sent_at[i] for i, (at, _) in closed.items()]
    assert all(BODY_S - 0.1 <= x <= BODY_S + SLACK_S for x in body_lifetimes)
    print(
        f"byte-by-byte head cut after {slow_s:.3f} s, half a keep-alive head after {kept_s:.3f} s; "
        f"stalled bodies answered 408 after "
        f"{min(body_lifetimes):.3f}-{max(body_lifetimes):.3f} s; the 101st connection got 503"
    )
    for s in bodies:
        s.close()

    # 4. Afterwards the service works as before, keep-alive included.
    with httpx.Client(base_url=svc.url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200
        doc = {"device_id": "after", "readings": [{"ts": 1_767_225_600, "values": [21.5]}]}
        r = client.post("/v1/score", json=doc)
        assert r.status_code == 200, r.text
        assert client.get("/healthz").status_code == 200

    assert svc.stop(30) == 0  # SIGTERM: still a graceful stop, exit 0
    log = svc.log_text()
    for bad in ("Traceback", "Errno 24", "Too many open files", "out of system resource"):
        assert bad not in log, f"{bad!r} in the service's log:\n{svc.log_tail()}"
    assert "MAX_CONNECTIONS lowered" not in log  # the cap held at 100 under this descriptor limit
    assert "answered 503" in log
    assert "answered 408" in log
    # ~400 events, a line per kind at once and the rest summed (here at the stop)
    assert len(svc.log_lines("(SENSORWATCH_HTTP_")) <= 10
    assert svc.log_lines("since the last report: ")


def test_cap_lowered_to_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Too few descriptors for HTTP_MAX_CONNECTIONS: the cap is what fits, said in one line."""
    monkeypatch.setattr(http_server, "fd_room", lambda: 50)
    with caplog.at_level(logging.WARNING, logger="sensorwatch.http"):
        limits = http_server.Limits.for_settings(load_settings(http_max_connections=1000))
    assert limits.max_connections == 50 - http_server.ACCEPT_SLACK
    assert limits.max_sockets == 50
    [line] = caplog.messages
    assert "SENSORWATCH_HTTP_MAX_CONNECTIONS lowered from 1000 to 34" in line
    monkeypatch.setattr(http_server, "fd_room", lambda: 10_000)
    assert http_server.Limits.for_settings(load_settings(http_max_connections=1000)).max_connections == 1000


def test_soft_descriptor_limit_raised_to_the_hard_one() -> None:
    """In a child (the limit is per process): soft 64 of hard 512 becomes 512 at start."""
    code = (
        "import resource; from service.http_server import fd_room; fd_room(); "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 512))

    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "512"


def test_accept_waits_at_the_socket_limit() -> None:
    """The listening socket accepts no more than ``max_sockets`` at once, whatever is queued: asyncio's
    accept loop (up to ``backlog`` per pass, before any protocol runs) cannot exhaust descriptors."""
    limits = http_server.Limits(1.0, 1.0, max_connections=1)
    limits.max_sockets = 2
    [listener] = http_server.listen("127.0.0.1", 0, limits)
    listener.listen(8)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    accepted: list[socket.socket] = []
    try:
        accepted += [listener.accept()[0] for _ in range(2)]
        assert limits.sockets == 2
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the third waits in the kernel's queue
        limits.sockets -= 1  # one closed (GuardedH11Protocol.connection_lost)
        accepted.append(listener.accept()[0])
    finally:
        for s in clients + accepted:
            s.close()
        listener.close()
