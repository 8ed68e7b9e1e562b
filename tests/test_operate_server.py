"""Operations on the real server (`cds-service serve`, two workers): one scrape for all workers, live policy reload
under load, a broken reload, and JSON logs from the app and gunicorn alike."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import builders as b
from .conftest import ROOT, SIGN
from .process_support import cds_service_command, free_port, running_server
from .store_support import flagged_call, plain_call

pytestmark = pytest.mark.slow

OLD, NEW = "2026.11.0", "2026.12.0"
POLICY_FILE = "dynamic-spinal-visualization.yaml"


def post(base: str, path: str, body: Any, timeout: float = 10) -> tuple[int, Any]:
    """One call on a new connection (so the kernel spreads calls over the workers' reuse_port sockets)."""
    request = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as response:
        return json.loads(response.read())


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def wait_until(check: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object, or this fails
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_one_scrape_counts_the_calls_of_both_workers_exactly(tmp_path: Path) -> None:
    with running_server(tmp_path, "--workers", "2", env={"CDS_LOG_FORMAT": "json"}) as (_, base, log):
        calls = [flagged_call()] * 20 + [plain_call()] * 15
        for body in calls:
            assert post(base, f"/cds-services/{SIGN}", body)[0] == 200
        for _ in range(5):
            assert post(base, f"/cds-services/{SIGN}", {"hook": "order-sign"})[0] == 400
        # Audit records are written in the background by each worker: wait for all 40.
        wait_until(lambda: total(scrape(base), "cds_audit_records_total", state="written") == 40, what="audit")
        # Several scrapes, each answered by whichever worker the kernel picks: all see the whole server.
        for _ in range(6):
            s = scrape(base)
            assert total(s, "cds_calls_total", service=SIGN, status="200") == 35
            assert total(s, "cds_calls_total", service=SIGN, status="400") == 5
            assert total(s, "cds_call_duration_seconds_count", service=SIGN, hook="order-sign") == 40
            assert total(s, "cds_orders_total", verdict="flagged") == 20
            assert total(s, "cds_orders_total", verdict="not-flagged") == 15
            assert total(s, "cds_cards_total") == 20
            assert total(s, "cds_audit_queue_depth") == 0
            assert total(s, "cds_policy_info") == 1
    served_by = Counter(
        line["process"]
        for line in json_lines(log)
        if line.get("logger") == "gunicorn.access" and line.get("path") == f"/cds-services/{SIGN}"
    )
    assert sum(served_by.values()) == 40 and len(served_by) == 2, served_by


def policy_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cards"
    folder.mkdir()
    shutil.copyfile(ROOT / "policies" / POLICY_FILE, folder / POLICY_FILE)
    return folder


def set_version(folder: Path, version: str) -> None:
    path = folder / POLICY_FILE
    text = path.read_text()
    current = OLD if f'version: "{OLD}"' in text else NEW
    path.write_text(text.replace(f'version: "{current}"', f'version: "{version}"', 1))


def versions_seen(base: str, answers: int = 8) -> set[str]:
    """The policy versions /health reports over several new connections (so both workers answer)."""
    return {get_json(base, "/health")["policies"][0]["version"] for _ in range(answers)}


class Hammer(threading.Thread):
    """Calls the service without pause until stopped (at most 3,000 calls or 90 s): statuses and failures."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.versions: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + 90
        while not self.stop.is_set() and sum(self.statuses.values()) < 3000 and time.monotonic() < deadline:
            call = flagged_call()
            # The coverage-information reason names the policy version that judged the order.
            call["prefetch"] = {"coverage": {"resourceType": "Coverage", "id": "cov1", "status": "active"}}
            try:
                status, body = post(self.base, f"/cds-services/{SIGN}", call)
            except Exception as exc:  # a dropped or refused connection is exactly what must not happen
                self.failures.append(repr(exc))
                continue
            self.statuses[status] += 1
            detail = json.dumps(body.get("systemActions")) if status == 200 else ""
            self.versions.append(NEW if f"version {NEW}" in detail else OLD if f"version {OLD}" in detail else "?")


def test_a_reload_switches_the_policy_under_load_without_a_failed_call(tmp_path: Path) -> None:
    folder = policy_folder(tmp_path)
    env = {"CDS_POLICY_DIR": str(folder)}
    with running_server(tmp_path, "--workers", "2", env=env) as (process, base, log):
        assert versions_seen(base) == {OLD}
        hammer = Hammer(base)
        hammer.start()
        try:
            wait_until(lambda: len(hammer.versions) >= 50, what="calls before the reload")
            set_version(folder, NEW)
            os.kill(process.pid, signal.SIGHUP)
            wait_until(lambda: versions_seen(base) == {NEW}, what="both workers on the new version")
            seen = len(hammer.versions)
            wait_until(lambda: len(hammer.versions) >= seen + 50, what="calls after the reload")
        finally:
            hammer.stop.set()
            hammer.join(30)
        assert hammer.failures == [] and set(hammer.statuses) == {200}, (hammer.failures, hammer.statuses)
        # Every call answered with one version or the other, in order: old, then (after the switch) new.
        assert hammer.versions[0] == OLD and hammer.versions[-1] == NEW and "?" not in hammer.versions
        assert process.poll() is None

        health = get_json(base, "/health")
        assert health["lastReload"]["ok"] is True and health["lastReload"]["error"] is None
        s = scrape(base)
        [(labels, _)] = [(dict(ls), v) for (n, ls), v in s.items() if n == "cds_policy_info" and v == 1]
        assert labels["version"] == NEW and labels["sha256"] == health["policies"][0]["sha256"]
        assert total(s, "cds_policy_reloads_total", result="ok") == 1
        assert total(s, "cds_policy_last_reload_ok") == 1
        wait_until(
            lambda: total(scrape(base), "cds_audit_records_total", state="written") == len(hammer.versions),
            what="audit",
        )
        # Each audit record keeps the version that judged it; the report splits the numbers by version.
        result = subprocess.run(
            [*cds_service_command(), "report", "--format", "json"],
            env={**os.environ, "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}"},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        versions = json.loads(result.stdout)["policyVersions"]
        assert versions["changed"] is True
        by_version = {v["version"]: v["flagged"] for v in versions["versions"]}
        assert by_version == {OLD: hammer.versions.count(OLD), NEW: hammer.versions.count(NEW)}
    text = log.read_text()
    assert f"replaced by dynamic-spinal-visualization {NEW}" in text
    assert f"policy dynamic-spinal-visualization version {OLD}" in text  # the start-up log names it


def test_a_broken_reload_keeps_the_running_policy_and_says_so(tmp_path: Path) -> None:
    folder = policy_folder(tmp_path)
    path = folder / POLICY_FILE
    good = path.read_text()
    with running_server(tmp_path, "--workers", "2", env={"CDS_POLICY_DIR": str(folder)}) as (process, base, log):
        # A typo in a key, on a line the error must name.
        broken = good.replace('  version: "2026.11.0"', '  version: "2026.12.0"\n  verison: "typo"', 1)
        path.write_text(broken)
        line = broken.splitlines().index('  verison: "typo"') + 1
        os.kill(process.pid, signal.SIGHUP)

        def failed_everywhere() -> bool:
            return all(get_json(base, "/health")["lastReload"]["ok"] is False for _ in range(8))

        wait_until(failed_everywhere, what="the failed reload in /health of both workers")
        health = get_json(base, "/health")
        assert health["policies"][0]["version"] == OLD and versions_seen(base) == {OLD}
        error = health["lastReload"]["error"]
        assert f"{path}" in error and f"line {line}" in error and "verison" in error
        call = flagged_call()
        call["prefetch"] = {"coverage": {"resourceType": "Coverage", "id": "cov1", "status": "active"}}
        status, body = post(base, f"/cds-services/{SIGN}", call)
        assert status == 200 and f"version {OLD}" in json.dumps(body["systemActions"])
        s = scrape(base)
        assert total(s, "cds_policy_reloads_total", result="failed") == 1
        assert total(s, "cds_policy_last_reload_ok") == 0

        # Fixed and reloaded: the new version, and /health says the last reload worked.
        path.write_text(good.replace(OLD, NEW, 1))
        os.kill(process.pid, signal.SIGHUP)
        wait_until(lambda: versions_seen(base) == {NEW}, what="the fixed reload")
        assert get_json(base, "/health")["lastReload"]["ok"] is True
        assert process.poll() is None
    assert "policy reload failed; still answering with dynamic-spinal-visualization 2026.11.0" in log.read_text()


def test_json_logs_are_one_object_per_line_and_call_lines_carry_the_call(tmp_path: Path) -> None:
    env = {"CDS_LOG_FORMAT": "json", "CDS_ALLOW_HTTP_FHIR": "true"}
    secret = "fhir-token-secret-3141"
    with running_server(tmp_path, "--workers", "2", env=env) as (process, base, log):
        # Coverage not prefetched and the FHIR server down: the read fails, a warning is logged during the call.
        body = flagged_call() | {
            "fhirServer": f"http://127.0.0.1:{free_port()}/fhir",
            "fhirAuthorization": {
                "access_token": secret,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/Coverage.read",
                "subject": "cds-service",
            },
        }
        assert post(base, f"/cds-services/{SIGN}", body)[0] == 200
        bad = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
        del bad["context"]
        assert post(base, f"/cds-services/{SIGN}", bad)[0] == 400
        assert post(base, "/cds-services/unknown", {})[0] == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    lines = json_lines(log)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert secret not in log.read_text()
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "gunicorn.access", "cds_service.ops.reload", "cds_service.fhir.client"} <= loggers

    access = [line for line in lines if line["logger"] == "gunicorn.access" and line["method"] == "POST"]
    by_path = {(line["path"], line["status"]): line for line in access}
    ok = by_path[(f"/cds-services/{SIGN}", 200)]
    assert (ok["service"], ok["hookInstance"]) == (SIGN, body["hookInstance"])
    refused = by_path[(f"/cds-services/{SIGN}", 400)]
    # Refused, yet its body named a hookInstance: the line carries it.
    assert (refused["service"], refused["hookInstance"]) == (SIGN, bad["hookInstance"])
    assert (
        "service" not in by_path[("/cds-services/unknown", 404)]
        or by_path[("/cds-services/unknown", 404)]["service"] is None
    )

    # The warning logged in the middle of the call carries the call's fields, its final status included.
    [warning] = [line for line in lines if line["logger"] == "cds_service.fhir.client"]
    assert warning["level"] == "WARNING" and "coverage read failed" in warning["message"]
    assert (warning["service"], warning["hookInstance"], warning["status"]) == (SIGN, body["hookInstance"], 200)
    # gunicorn's own start and stop lines are JSON too.
    messages = [line["message"] for line in lines if line["logger"] == "gunicorn.error"]
    assert any(m.startswith("Booting worker") for m in messages)
    # The start-up line names where the service listens (with reuse_port gunicorn's master holds no socket to name).
    assert any(m == f"Listening at: {base} ({process.pid})" for m in messages), messages
    assert any("Shutting down" in m or "Handling signal: term" in m for m in messages)
