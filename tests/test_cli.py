"""The command line: evaluate, check-policy, and the installed package finding its policy files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cds_service.cli import main

from .conftest import ROOT
from .process_support import build_wheel

FIXTURES = ROOT / "fixtures" / "hooks"
DSV_REQUEST = FIXTURES / "order-select-r4-dsv-selected.request.json"


def run(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cds_service", *args],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


def test_evaluate_prints_the_response(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(DSV_REQUEST)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["cards"]) == 1 and len(data["systemActions"]) == 1


def test_evaluate_reads_standard_input() -> None:
    result = run("evaluate", "-", stdin=DSV_REQUEST.read_bytes())
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["cards"]) == 1


def test_evaluate_explain_gives_verdicts_and_evidence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--explain", str(FIXTURES / "order-sign-r4-dmx-lumbar.request.json")]) == 0
    out = capsys.readouterr().out
    assert "ServiceRequest/img-dmx-2: FLAGGED" in out
    assert "ServiceRequest/lab-cbc: not flagged" in out
    assert "for:" in out and "DMX" in out
    assert "region:  lumbar" in out


def test_evaluate_explain_shows_evidence_against_a_look_alike(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--explain", str(FIXTURES / "order-sign-r4-swallow-study.request.json")]) == 0
    out = capsys.readouterr().out
    assert "not flagged" in out and "against:" in out and "swallow" in out


def test_evaluate_refused_request_exits_1_with_an_operation_outcome(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hook": "order-sign", "hookInstance": "nope", "context": {}}))
    result = run("evaluate", str(bad))
    assert result.returncode == 1
    assert '"OperationOutcome"' in result.stderr and "hookInstance" in result.stderr


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"hook": ' + b"[" * 300 + b"]" * 300 + b"}"])
def test_evaluate_unreadable_input_exits_2(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert run("evaluate", str(path)).returncode == 2
    assert run("evaluate", str(tmp_path / "missing.json")).returncode == 2


def test_check_policy_ok_and_broken(tmp_path: Path) -> None:
    ok = run("check-policy")
    assert ok.returncode == 0 and "ok" in ok.stdout and "dsv-order-sign" in ok.stdout
    assert re.search(r"examples: \d{3,} .*precision 1.000, recall 1.000", ok.stdout), ok.stdout
    (tmp_path / "bad.yaml").write_text("policy:\n  id: x\n")
    broken = run("check-policy", str(tmp_path))
    assert broken.returncode == 1
    assert "bad.yaml: policy.title, line 1: 'title' is required" in broken.stdout
    assert "bad.yaml: decision, line 1: 'decision' is required" in broken.stdout
    assert "policy check failed" in broken.stderr


def test_flask_run_entry_point_finds_the_app() -> None:
    env = {**os.environ, "CDS_AUTH": "off"}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "cds_service", "routes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "/cds-services/<service_id>" in result.stdout


@pytest.mark.slow
def test_built_wheel_finds_its_policy_files_from_another_folder(tmp_path: Path) -> None:
    """A plain, non-editable install carries policies/ inside the package and works outside the checkout."""
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "cds_service/_policies/dynamic-spinal-visualization.yaml" in names
    for path in ("env.py", "script.py.mako", "versions/0001_initial.py"):
        assert f"cds_service/store/migrations/{path}" in names
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CDS_POLICY_DIR"} | {"PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import cds_service, sys; print(cds_service.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=60,
        check=False,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    check = run("check-policy", cwd=elsewhere, env=env)
    assert check.returncode == 0, check.stderr
    assert str(target) in check.stdout
    evaluated = run("evaluate", str(DSV_REQUEST), cwd=elsewhere, env=env)
    assert evaluated.returncode == 0 and len(json.loads(evaluated.stdout)["cards"]) == 1


def test_check_policy_refuses_card_text_too_long_to_scan(tmp_path: Path) -> None:
    # The card's own words must leave room for the order's name and why it matched within 120 words.
    policy = (ROOT / "policies" / "dynamic-spinal-visualization.yaml").read_text()
    long_evidence = "Long evidence. " * 60
    marker = "    No study shows that it improves diagnosis or outcomes, and no guideline recommends it.\n"
    assert marker in policy
    (tmp_path / "long.yaml").write_text(policy.replace(marker, f"    {long_evidence}\n"))
    broken = run("check-policy", str(tmp_path))
    assert broken.returncode == 1
    assert "long.yaml: card" in broken.stdout and "leave room for the order's name" in broken.stdout
