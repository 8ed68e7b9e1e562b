"""The engine stands alone: importing it (or the package) loads no web, HTTP or database library, and it type-checks
under mypy --strict; the whole tree passes ruff."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

WEB_STACK = ("flask", "werkzeug", "requests", "sqlalchemy", "gunicorn", "psycopg", "alembic")


@pytest.mark.parametrize("module", ["cds_service", "cds_service.engine", "cds_service.engine.policy"])
def test_importing_loads_no_web_or_database_library(module: str) -> None:
    probe = (
        f"import sys, {module}; loaded = sorted(m for m in {WEB_STACK!r} if m in sys.modules); print(','.join(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} loads {result.stdout.strip()}"


def test_the_engine_judges_after_an_import_of_only_the_engine() -> None:
    probe = (
        "import sys; from cds_service.engine import load_policies, judge, read_order; "
        "p = load_policies().policies[0]; "
        "v = judge(read_order({'resourceType': 'ServiceRequest', 'id': 'x', 'code': {'text': 'DMX cervical'}}), p); "
        "print(v.flagged, v.rule, 'flask' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "technique-named", "False"]


@pytest.mark.slow
def test_the_engine_type_checks_strictly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "cds_service/engine"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_ruff_finds_nothing() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
