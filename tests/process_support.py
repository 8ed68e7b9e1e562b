"""Running the real thing from tests: `cds-service serve` as a subprocess, and the package built as a wheel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cds_service_command() -> list[str]:
    """The console script installed beside this interpreter, as a user runs it (else `python -m cds_service`)."""
    script = Path(sys.executable).with_name("cds-service")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cds_service"]


@contextmanager
def running_server(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, ready_path: str = "/health", timeout: float = 60
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Start `cds-service serve` on a free port; yield (process, base URL, log file) once `ready_path` answers 200."""
    port = free_port()
    environment = {
        **os.environ,
        "CDS_AUTH": "off",
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
        "CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        **(env or {}),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*cds_service_command(), "serve", "--port", str(port), *args],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}{ready_path}", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {process.returncode}):\n{log.read_text()}")
            time.sleep(0.1)
        yield process, base, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def build_wheel(folder: Path) -> Path:
    """Build this checkout's wheel, as `pip install .` would, without downloading anything."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(folder), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = folder.glob("cds_service-*.whl")
    return wheel
