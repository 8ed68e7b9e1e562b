"""The operator's kit in deploy/: alert rules checked and unit-tested by promtool, every metric the dashboard and the
rules name found in a scrape of a running app, the systemd unit verified, the nginx TLS proxy run for real."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cds_service import create_app
from cds_service.runtime import services_of

from . import builders as b
from .conftest import ROOT, SIGN
from .fhir_server import make_certificate
from .process_support import free_port, running_server
from .store_support import flagged_call

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "cds-service-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "cds-service-dashboard.json"
UNIT = DEPLOY / "systemd" / "cds-service.service"
NGINX = DEPLOY / "nginx" / "cds-service.conf"
# Series Prometheus records itself for every target (not the service's to export).
PROMETHEUS_OWN = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
METRIC = re.compile(r"\b(cds_[a-z_]+)\b")
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {package}; .ci/run installs it)")
    return path


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = need("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 9 rules found" in check.stdout
    # Each alert fires on the series that should fire it, with the labels and text an operator reads.
    tests = subprocess.run(
        [promtool, "test", "rules", RULES.with_name("cds-service-rules.test.yml").name],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert {
        "CdsFhirCircuitBreakerOpen",
        "CdsAuditWriteFailures",
        "CdsAuditSpilling",
        "CdsPolicyReloadFailed",
        "CdsErrorRate",
        "CdsLatencyP99Over500ms",
    } <= alerts


def scrape_after_traffic(tmp_path: Path) -> dict[str, set[str]]:
    """The sample names a running app's /metrics exposes, each with its label names, after calls that touch every
    part: answered, refused and flagged calls, FHIR reads that fail until the breaker opens, feedback."""
    app = create_app(
        {
            "AUTH": "off",
            "ALLOW_HTTP_FHIR": True,
            "FHIR_TIMEOUT": 0.5,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'scrape.sqlite3'}",
        }
    )
    client = app.test_client()
    down = f"http://127.0.0.1:{free_port()}/fhir"
    for _ in range(4):  # the Coverage read fails every time: the breaker opens after three
        assert client.post(f"/cds-services/{SIGN}", json=flagged_call() | {"fhirServer": down}).status_code == 200
    answer = client.post(f"/cds-services/{SIGN}", json=flagged_call()).get_json()
    bad = b.hook_request("order-sign", [b.service_request("x", text="CBC")])
    del bad["context"]
    assert client.post(f"/cds-services/{SIGN}", json=bad).status_code == 400
    assert services_of(app).store.writer.flush(10)
    card = answer["cards"][0]
    suggestion = card["suggestions"][0]["uuid"]
    item = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": suggestion}],
        "outcomeTimestamp": "2026-12-01T10:00:00Z",
    }
    feedback = {"feedback": [item]}
    assert client.post(f"/cds-services/{SIGN}/feedback", json=feedback).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        # A family with no sample yet still names its series by its type.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            exported.setdefault(family.name + suffix, set())
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def test_every_metric_and_label_the_dashboard_and_rules_name_is_one_the_service_exports(tmp_path: Path) -> None:
    exported = scrape_after_traffic(tmp_path)
    expressions = rule_expressions() + dashboard_expressions()
    named = {m for expr in expressions for m in METRIC.findall(expr)}
    assert named, "no cds_ metric found in the dashboard and rules"
    assert named - exported.keys() == set()
    # Nothing else than the service's metrics and Prometheus's own `up`.
    selectors = [(name, body) for expr in expressions for name, body in SELECTOR.findall(expr)]
    assert {name for name, _ in selectors} - exported.keys() <= PROMETHEUS_OWN
    # Every label a selector matches on is one the metric carries (the ones with samples after the traffic above).
    for name, body in selectors:
        if name in PROMETHEUS_OWN or not exported[name]:
            continue
        labels = set(MATCHER.findall(body)) - TARGET_LABELS
        assert labels <= exported[name], (name, labels)
    # The traffic reached what the alerts are about: breakers, audit records, calls by status.
    for name in ("cds_fhir_breaker_state", "cds_audit_records_total", "cds_calls_total"):
        assert exported[name], name


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cds-service" and dashboard["title"] == "cds-service"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = need("systemd-analyze", "systemd")
    script = shutil.which("cds-service") or str(Path(ROOT / ".venv" / "bin" / "cds-service"))
    unit = tmp_path / "cds-service.service"
    unit.write_text(UNIT.read_text().replace("/opt/cds-service/bin/cds-service", script))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    # An unknown or misspelt directive is only a warning on stderr: none may be there.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.slow
def test_the_nginx_config_serves_the_real_server_over_tls(tmp_path: Path) -> None:
    nginx = need("nginx", "nginx-light")
    certificate = make_certificate(tmp_path)
    port = free_port()
    with running_server(tmp_path, "--workers", "1", env={"CDS_PUBLIC_URL": f"https://127.0.0.1:{port}"}) as (
        _process,
        base,
        _log,
    ):
        upstream = base.removeprefix("http://")
        # The example as shipped, pointed at this test's certificate, ports and folders.
        site = (
            NGINX.read_text()
            .replace("server 127.0.0.1:8080;", f"server {upstream};")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
            .replace("listen [::]:443 ssl;", "")
            .replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
            .replace("listen [::]:80;", "")
            .replace("/etc/ssl/cds-service/fullchain.pem", str(certificate.cert_file))
            .replace("/etc/ssl/cds-service/privkey.pem", str(certificate.key_file))
            .replace("/var/log/nginx/cds-service.access.log", str(tmp_path / "access.log"))
        )
        (tmp_path / "site.conf").write_text(site)
        (tmp_path / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
            f"events {{}}\nhttp {{\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
            f"  access_log off;\n  include {tmp_path / 'site.conf'};\n}}\n"
        )
        command = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        proxy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            context = ssl.create_default_context(cafile=str(certificate.cert_file))
            body = flagged_call()
            request = urllib.request.Request(
                f"https://127.0.0.1:{port}/cds-services/{SIGN}?secret-query=1",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=5, context=context) as response:
                        answer = json.loads(response.read())
                        status = response.status
                    break
                except (ConnectionError, urllib.error.URLError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
    assert status == 200 and answer["cards"][0]["indicator"] == "warning"
    log = (tmp_path / "access.log").read_text()
    assert f'"POST /cds-services/{SIGN}" 200' in log and "secret-query" not in log
