"""`cds-service serve`: the real server on a free port, called over HTTP, stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from . import builders as b
from .conftest import SIGN

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command() -> list[str]:
    # The console script installed beside this interpreter, as a user would run it.
    script = Path(sys.executable).with_name("cds-service")
    return [str(script)] if script.exists() else [shutil.which("cds-service") or "cds-service"]


@contextmanager
def server(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    environment = {
        **os.environ,
        "CDS_AUTH": "off",
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        **(env or {}),
    }
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*command(), "serve", "--port", str(port), *args],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {process.returncode}):\n{log.read_text()}")
            time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def post(base: str, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_hooks_and_stops_cleanly(tmp_path: Path, stop: signal.Signals) -> None:
    with server(tmp_path, "--workers", "2") as (process, base):
        with urllib.request.urlopen(f"{base}/cds-services", timeout=5) as response:
            assert len(json.loads(response.read())["services"]) == 2
        order = b.service_request("d1", text="Digital motion x-ray of the cervical spine")
        status, headers, body = post(base, f"/cds-services/{SIGN}", b.hook_request("order-sign", [order]))
        assert status == 200 and len(body["cards"]) == 1
        assert headers["Content-Type"] == "application/json"
        assert "gunicorn" not in headers.get("Server", "").lower()
        status, _, body = post(base, f"/cds-services/{SIGN}", {"hook": "order-sign"})
        assert status == 400 and body["resourceType"] == "OperationOutcome"
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0


def test_serve_refuses_to_start_on_a_broken_policy(tmp_path: Path) -> None:
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "broken.yaml").write_text("policy: {id: x}\n")
    env = {**os.environ, "CDS_AUTH": "off", "CDS_POLICY_DIR": str(tmp_path / "cards")}
    result = subprocess.run(
        [*command(), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "broken.yaml" in result.stderr
