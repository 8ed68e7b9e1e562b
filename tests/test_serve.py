"""`cds-service serve`: the real server on a free port, called over HTTP, stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from . import builders as b
from .conftest import SIGN
from .process_support import cds_service_command, free_port, running_server

pytestmark = pytest.mark.slow


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
    with running_server(tmp_path, "--workers", "2") as (process, base, _):
        with urllib.request.urlopen(f"{base}/cds-services", timeout=5) as response:
            assert len(json.loads(response.read())["services"]) == 5  # every CRD hook the policy file names
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
        [*cds_service_command(), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "broken.yaml" in result.stderr


def test_a_second_server_on_the_same_port_refuses_to_start(tmp_path: Path) -> None:
    with running_server(tmp_path) as (_, base, _log):
        port = base.rsplit(":", 1)[1]
        env = {**os.environ, "CDS_AUTH": "off", "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'other.sqlite3'}"}
        result = subprocess.run(
            [*cds_service_command(), "serve", "--port", port],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "cannot listen" in result.stderr
