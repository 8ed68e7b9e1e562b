"""The app factory: settings from the environment and the mapping, defaults, and start-up failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds_service import create_app
from cds_service.config import ConfigError
from cds_service.engine import PolicyError


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDS_AUTH", "CDS_PUBLIC_URL", "CDS_POLICY_DIR", "CDS_CORS_ORIGINS", "CDS_AUDIT_DURABILITY"):
        monkeypatch.delenv(name, raising=False)
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"})
    assert app.config["AUTH"] == "jwt"  # secure by default
    assert app.config["CORS_ORIGINS"] == []
    assert app.config["MAX_CONTENT_LENGTH"] == 5 * 1024 * 1024
    assert app.config["FHIR_TIMEOUT"] == 3.0
    assert app.config["FHIR_MAX_READS"] == 16
    assert (app.config["FHIR_BREAKER_FAILURES"], app.config["FHIR_BREAKER_COOLDOWN"]) == (3, 30.0)
    assert app.config["AUDIT_DURABILITY"] == "sync"  # an answered call's record is on disk before it answers


def test_environment_is_read_and_the_mapping_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDS_AUTH", "off")
    monkeypatch.setenv("CDS_PUBLIC_URL", "https://cds.example.org/")
    monkeypatch.setenv("CDS_FHIR_TIMEOUT", "1.5")
    app = create_app({"PUBLIC_URL": "https://other.example.org", "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert app.config["AUTH"] == "off"
    assert app.config["FHIR_TIMEOUT"] == 1.5
    assert app.config["PUBLIC_URL"] == "https://other.example.org"


def test_prefixed_names_are_accepted_in_the_mapping(tmp_path: Path) -> None:
    app = create_app({"CDS_AUTH": "off", "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert app.config["AUTH"] == "off"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AUTH", "maybe"),
        ("PUBLIC_URL", "cds.example.org"),
        ("FHIR_TIMEOUT", "soon"),
        ("FHIR_TIMEOUT", "0"),
        ("ALLOW_HTTP_FHIR", "perhaps"),
        ("FHIR_MAX_READS", "0"),
        ("FHIR_BREAKER_FAILURES", "three"),
        ("FHIR_BREAKER_COOLDOWN", "-1"),
        ("FHIR_BREAKER_WINDOW", "0"),
        ("AUDIT_DURABILITY", "fast"),
    ],
)
def test_bad_settings_stop_start_up(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        create_app({name: value})


def test_broken_policy_folder_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("policy: [this is not a mapping\n")
    with pytest.raises(PolicyError, match=r"broken\.yaml"):
        create_app({"POLICY_DIR": str(tmp_path), "AUTH": "off"})
