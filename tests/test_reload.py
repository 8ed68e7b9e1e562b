"""Policy reload in one process (the same code the serve master runs on SIGHUP): check first, then switch at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cds_service import create_app
from cds_service.runtime import services_of

from .conftest import ROOT, SIGN
from .store_support import flagged_call
from .test_metrics import scrape, value

FILE = "dynamic-spinal-visualization.yaml"


def test_a_valid_change_switches_policies_services_and_discovery_together(tmp_path: Path) -> None:
    folder = tmp_path / "cards"
    folder.mkdir()
    shutil.copyfile(ROOT / "policies" / FILE, folder / FILE)
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}", "POLICY_DIR": folder})
    client = app.test_client()
    before = services_of(app).runtime
    text = (folder / FILE).read_text()
    (folder / FILE).write_text(text.replace('version: "2026.11.0"', 'version: "2026.12.0"', 1))

    assert services_of(app).reloader.reload() is True
    after = services_of(app).runtime
    assert after is not before and after.policies is not before.policies
    assert after.audit is before.audit and after.authenticator is before.authenticator  # shared parts stay
    assert before.policies.policies[0].version == "2026.11.0"  # a call in flight keeps what it started with
    health = client.get("/health").get_json()
    assert [p["version"] for p in health["policies"]] == ["2026.12.0"]
    assert health["lastReload"]["ok"] is True and health["lastReload"]["error"] is None
    call = flagged_call()
    call["prefetch"] = {"coverage": {"resourceType": "Coverage", "id": "cov1", "status": "active"}}
    actions = client.post(f"/cds-services/{SIGN}", json=call).get_json()["systemActions"]
    assert "version 2026.12.0" in json.dumps(actions)  # the coverage-information reason names the version
    s = scrape(client)
    info = [dict(labels)["version"] for (name, labels), v in s.items() if name == "cds_policy_info"]
    assert info == ["2026.12.0"]  # the replaced version is no longer shown
    assert value(s, "cds_policy_reloads_total", result="ok") == 1


def test_an_invalid_change_keeps_the_running_policy(tmp_path: Path) -> None:
    folder = tmp_path / "cards"
    folder.mkdir()
    shutil.copyfile(ROOT / "policies" / FILE, folder / FILE)
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'c.sqlite3'}", "POLICY_DIR": folder})
    client = app.test_client()
    running = services_of(app).runtime
    (folder / "second.yaml").write_text("policy:\n  id: second\n  bogus: [\n")

    assert services_of(app).reloader.reload() is False
    assert services_of(app).runtime is running
    last = client.get("/health").get_json()["lastReload"]
    assert last["ok"] is False and f"{folder / 'second.yaml'}" in last["error"] and "line" in last["error"]
    assert client.post(f"/cds-services/{SIGN}", json=flagged_call()).status_code == 200
    s = scrape(client)
    assert value(s, "cds_policy_reloads_total", result="failed") == 1
    assert value(s, "cds_policy_last_reload_ok") == 0
