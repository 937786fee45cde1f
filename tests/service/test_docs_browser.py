"""``/docs`` renders offline (issue #13, scope 7): Debian's Chromium, headless, loads the page of a
real ``sensorwatch serve`` with every host name but 127.0.0.1 unresolvable (as on a plant network
without internet), runs Swagger UI's JavaScript and must show every operation of the API. A
screenshot of the rendered page is written to ``DOCS_SCREENSHOT`` when set
(``docs/docs-offline.png`` was made that way)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import ServiceProcess

CHROMIUM = shutil.which("chromium")
#: Offline: no name resolves except the service's own address.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
OPERATIONS = {
    ("post", "/v1/score"),
    ("get", "/v1/devices/{device_id}"),
    ("delete", "/v1/devices/{device_id}"),
    ("get", "/v1/models"),
    ("post", "/v1/models/reload"),
    ("get", "/healthz"),
    ("get", "/readyz"),
}


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", OFFLINE]
    # virtual time: the page is dumped once its scripts and their fetches (openapi.json) are done.
    return subprocess.run(
        [*base, "--virtual-time-budget=15000", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (make test installs it: scripts/ensure-chromium.sh)"
)
def test_docs_render_every_operation_without_internet(tmp_path: Path) -> None:
    with ServiceProcess({"SENSORWATCH_STATE_DIR": str(tmp_path / "state")}, tmp_path) as svc:
        svc.start()
        svc.wait_ready(60)
        dom = _chromium("--dump-dom", f"{svc.url}/docs", cwd=tmp_path).stdout
        shot = os.environ.get("DOCS_SCREENSHOT")
        if shot:
            _chromium(
                "--window-size=1280,1500",
                f"--screenshot={Path(shot).resolve()}",
                f"{svc.url}/docs",
                cwd=tmp_path,
            )
    assert "Unable to render this definition" not in dom
    # Swagger UI renders each operation as a block carrying its path; its method is a label.
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    methods = set(re.findall(r'opblock-summary-method">(\w+)<', dom))
    assert {p for _, p in OPERATIONS} <= paths, (sorted(paths), dom[:2000])
    assert {m.upper() for m, _ in OPERATIONS} <= methods, sorted(methods)
    assert "sensorwatch" in dom
