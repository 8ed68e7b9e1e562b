"""CORS for browser clients (the CDS Hooks sandbox): preflights without a JWT, listed origins only, errors included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_service import create_app
from cds_service.config import ConfigError

from .builders import hook_request, service_request
from .jwt_support import EHR, PUBLIC_URL, SELECT_URL, Key, bearer, claims, ec_key, issuers_file, jwks, token

SANDBOX = "https://sandbox.cds-hooks.org"
LOCAL_UI = "http://localhost:3000"
SELECT = "/cds-services/dsv-order-select"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Allow-Credentials",
    "Access-Control-Max-Age",
)


@pytest.fixture(scope="module")
def key() -> Key:
    return ec_key("ES384")


def make_client(tmp_path: Path, key: Key, origins: Any) -> FlaskClient:
    path = issuers_file(tmp_path / "issuers.json", [{"iss": EHR, "jwks": jwks(key)}])
    config: dict[str, Any] = {
        "AUTH": "jwt",
        "TRUSTED_ISSUERS": str(path),
        "PUBLIC_URL": PUBLIC_URL,
        "DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3",
        "AUDIT": False,
    }
    if origins is not None:
        config["CORS_ORIGINS"] = origins
    return create_app(config).test_client()


@pytest.fixture
def client(tmp_path: Path, key: Key) -> FlaskClient:
    # Configured the way operators write it: spaces, a trailing slash, upper case in the host.
    return make_client(tmp_path, key, f" https://Sandbox.CDS-Hooks.org/ ,{LOCAL_UI}")


def preflight(client: FlaskClient, origin: str, path: str = SELECT) -> Any:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


def body() -> dict[str, Any]:
    return hook_request("order-select", [service_request(text="Dynamic spinal visualization", cpt="76496")])


@pytest.mark.parametrize("origin", [SANDBOX, LOCAL_UI])
@pytest.mark.parametrize("path", [SELECT, f"{SELECT}/feedback", "/cds-services"])
def test_preflight_from_a_listed_origin_succeeds_without_a_token(client: FlaskClient, origin: str, path: str) -> None:
    response = preflight(client, origin, path)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == origin
    allowed_headers = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.vary
    assert response.data == b""


def test_browser_call_from_a_listed_origin_carries_the_origin(client: FlaskClient, key: Key) -> None:
    headers = {"Origin": SANDBOX, **bearer(token(key, claims(SELECT_URL)))}
    response = client.post(SELECT, json=body(), headers=headers)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.vary


@pytest.mark.parametrize(
    ("method", "path", "data", "with_token", "status"),
    [
        ("POST", SELECT, None, False, 401),  # no token
        ("POST", SELECT, b"{not json", True, 400),
        ("POST", "/cds-services/no-such-service", None, True, 404),
        ("GET", SELECT, None, False, 405),
        ("POST", SELECT, b"[" + b" " * (5 * 1024 * 1024) + b"]", True, 413),
    ],
)
def test_error_responses_carry_the_origin_too(
    client: FlaskClient, key: Key, method: str, path: str, data: bytes | None, with_token: bool, status: int
) -> None:
    """Without CORS headers on errors a browser hides the status from the page (CDS Hooks, "Browsers")."""
    headers = {"Origin": SANDBOX, "Content-Type": "application/json"}
    if with_token:
        headers.update(bearer(token(key, claims(SELECT_URL))))
    payload = data if data is not None else (b"" if method == "GET" else client.application.json.dumps(body()))
    response = client.open(path, method=method, data=payload, headers=headers)
    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX
    assert response.json is not None and response.json["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.org",
        "https://sandbox.cds-hooks.org.evil.example.org",
        "http://sandbox.cds-hooks.org",  # another scheme is another origin
        "https://sandbox.cds-hooks.org:8443",
        "null",
    ],
)
def test_other_origins_get_no_cors_headers(client: FlaskClient, key: Key, origin: str) -> None:
    refused = preflight(client, origin)
    assert not any(h in refused.headers for h in CORS_HEADERS)
    for response in (
        client.post(SELECT, json=body(), headers={"Origin": origin, **bearer(token(key, claims(SELECT_URL)))}),
        client.post(SELECT, json=body(), headers={"Origin": origin}),
    ):
        assert response.status_code in (200, 401)
        assert not any(h in response.headers for h in CORS_HEADERS)


def test_calls_without_an_origin_get_no_cors_headers(client: FlaskClient) -> None:
    response = client.post(SELECT, json=body())
    assert response.status_code == 401
    assert not any(h in response.headers for h in CORS_HEADERS)


def test_no_origins_configured_means_no_cors_at_all(tmp_path: Path, key: Key) -> None:
    client = make_client(tmp_path, key, None)
    for response in (preflight(client, SANDBOX), client.post(SELECT, json=body(), headers={"Origin": SANDBOX})):
        assert not any(h in response.headers for h in CORS_HEADERS)


def test_star_allows_any_origin_but_never_with_credentials(tmp_path: Path, key: Key) -> None:
    client = make_client(tmp_path, key, "*")
    allowed = preflight(client, "https://anywhere.example.org")
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    for response in (
        client.post(SELECT, json=body(), headers={"Origin": "https://anywhere.example.org"}),
        client.post(
            SELECT,
            json=body(),
            headers={"Origin": "https://anywhere.example.org", **bearer(token(key, claims(SELECT_URL)))},
        ),
    ):
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    "origins",
    ["sandbox.cds-hooks.org", "https://sandbox.cds-hooks.org/cds-services", "ftp://files.example.org", "https://"],
)
def test_origins_that_are_not_origins_stop_start_up(tmp_path: Path, key: Key, origins: str) -> None:
    with pytest.raises(ConfigError, match="CDS_CORS_ORIGINS"):
        make_client(tmp_path, key, origins)


def test_security_headers_on_service_and_error_responses(client: FlaskClient, key: Key) -> None:
    ok = client.post(SELECT, json=body(), headers=bearer(token(key, claims(SELECT_URL))))
    refused = client.post(SELECT, json=body())
    for response in (ok, refused):
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "Server" not in response.headers  # the app adds no banner (server.py names gunicorn "cds-service")
    discovery = client.get("/cds-services")
    assert discovery.headers["X-Content-Type-Options"] == "nosniff"
    assert "no-store" not in discovery.headers.get("Cache-Control", "")  # discovery may be cached
