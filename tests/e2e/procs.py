"""The service as a real OS process: ``python -m service.cli serve`` (uvicorn, signal handling, exit codes).

:class:`ServiceProcess` starts, polls, kills (``SIGKILL``), stops (``SIGTERM``) and restarts one
service on one port with one environment, for tests that crash it or inject faults through the
environment (e.g. ``SENSORWATCH_TEST_KILL_AT=<point>:<n>``: the service kills itself, the test waits
with :meth:`ServiceProcess.wait_exit`). Every start appends to the same log file, after a marker line::

    with ServiceProcess({"SENSORWATCH_MQTT_URL": broker.url, ...}, tmp_path) as svc:
        svc.start()
        svc.wait_ready(30)
        svc.kill9()  # the same port, environment and log on the next start()
        svc.start()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

from tests.e2e.harness import free_port
from tests.support import ADMIN_TOKEN

REPO = Path(__file__).resolve().parents[2]


def service_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its ``SENSORWATCH_*`` variables, plus ``env`` (and the admin
    token unless ``env`` sets one; unbuffered output, so a killed process leaves a complete log)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("SENSORWATCH_")}
    out["PYTHONUNBUFFERED"] = "1"
    out["SENSORWATCH_ADMIN_TOKEN"] = ADMIN_TOKEN
    out.update(env)
    return out


class ServiceProcess:
    """One ``sensorwatch serve`` on a free port (kept across restarts); killed at the ``with`` exit."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        name: str = "service",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.env = service_env(env)
        self.port = port or free_port()
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{name}.log"
        self.name = name
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the process (returns at once; see :meth:`wait_ready`)."""
        assert not self.running, f"{self.name} is already running (pid {self.pid})"
        self.starts += 1
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), *self.extra_args]
        with open(self.log, "ab") as log:
            log.write(f"\n===== {self.name}: start #{self.starts} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll ``GET /readyz`` until 200; returns the seconds it took. Fails (with the log's tail)
        when the process exits or the time is up."""
        assert self.proc is not None, "not started"
        started = time.monotonic()
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            if self._ready():
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        """``SIGKILL`` (no drain, no snapshot, no clean disconnect) and reap it."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        """``SIGTERM`` (graceful: drain, snapshot, clean disconnect); returns the exit code. Killed and
        reported (with the log's tail) when it does not exit in time."""
        assert self.proc is not None, "not started"
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself (a fault it was told to inject); returns the exit code
        (negative: the signal that ended it). Killed and reported when it is still alive after ``timeout``."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f} s:\n{self.log_tail()}"
            ) from None

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=timeout)

    def metrics(self) -> str:
        """The Prometheus exposition (``GET /metrics``)."""
        r = self.get("/metrics")
        r.raise_for_status()
        return r.text

    # ------------------------------------------------------------------ log
    def log_text(self) -> str:
        """Everything every start of this process wrote (stdout and stderr)."""
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def log_lines(self, containing: str) -> list[str]:
        """The log's lines that contain ``containing`` (every start's)."""
        return [line for line in self.log_text().splitlines() if containing in line]

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill9()
