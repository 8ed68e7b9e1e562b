"""Client authentication: real signed CDS Hooks JWTs end to end through the app, a real JWKS server, the verifier."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service import create_app
from cds_service.audit import Identity
from cds_service.auth.tokens import (
    Authenticator,
    AuthError,
    JwksFetchError,
    TrustedIssuer,
    fetch_jwks,
    load_issuers,
    parse_issuers,
    parse_jwks,
)
from cds_service.config import ConfigError
from cds_service.runtime import services_of
from cds_service.store.jti import MemoryJtiStore

from .builders import hook_request, service_request
from .jwt_support import (
    EHR,
    PUBLIC_URL,
    SELECT_URL,
    SIGN_URL,
    FakeClock,
    JwksServer,
    Key,
    bearer,
    claims,
    ec_key,
    issuers_file,
    jwks,
    raw_token,
    rsa_key,
    token,
)

SELECT = "/cds-services/dsv-order-select"
FEEDBACK = "/cds-services/dsv-order-select/feedback"
TENANTED = "https://tenanted.example.org"
UNAUTHORIZED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "login", "diagnostics": "Unauthorized."}],
}


@pytest.fixture(scope="module")
def es() -> Key:
    return ec_key("ES384")


@pytest.fixture(scope="module")
def rs() -> Key:
    return rsa_key("RS384")


@pytest.fixture(scope="module")
def tenant_key() -> Key:
    return ec_key("ES256")


AppFactory = Callable[..., FlaskClient]


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[AppFactory]:
    """Build an app with CDS_AUTH=jwt trusting `issuers` (written to a file), and return its test client."""
    apps: list[Flask] = []

    def build(issuers: list[dict[str, Any]], **config: Any) -> FlaskClient:
        path = issuers_file(tmp_path / f"issuers-{len(apps)}.json", issuers)
        app = create_app(
            {
                "AUTH": "jwt",
                "TRUSTED_ISSUERS": str(path),
                "PUBLIC_URL": PUBLIC_URL,
                "DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3",
                # The jti store is the database's; the audit writer's thread is not what these tests are about.
                "AUDIT": False,
                **config,
            }
        )
        app.config["TESTING"] = True
        apps.append(app)
        return app.test_client()

    yield build


@pytest.fixture
def client(make_client: AppFactory, es: Key, rs: Key, tenant_key: Key) -> FlaskClient:
    return make_client(
        [
            {"iss": EHR, "jwks": jwks(es, rs), "description": "the test EHR"},
            {"iss": TENANTED, "jwks": jwks(tenant_key), "tenants": ["tenant-1", "tenant-2"]},
        ]
    )


def authenticator(client: FlaskClient) -> Authenticator:
    auth = services_of(client.application).runtime.authenticator
    assert isinstance(auth, Authenticator)
    return auth


def select_body() -> dict[str, Any]:
    order = service_request(text="Dynamic spinal visualization", cpt="76496", body_site=("122496007", "Lumbar spine"))
    return hook_request("order-select", [order])


def call(client: FlaskClient, tok: str | None, path: str = SELECT, body: Any = None) -> Any:
    headers = bearer(tok) if tok is not None else {}
    return client.post(path, json=select_body() if body is None else body, headers=headers)


# --- accepted --------------------------------------------------------------------------------------------------------


def test_es384_token_is_accepted(client: FlaskClient, es: Key) -> None:
    response = call(client, token(es))
    assert response.status_code == 200, response.json
    assert response.json["cards"], "a DSV order answered with its card"


def test_rs384_token_is_accepted(client: FlaskClient, rs: Key) -> None:
    response = call(client, token(rs))
    assert response.status_code == 200, response.json


def test_aud_may_be_a_list_that_names_the_endpoint(client: FlaskClient, es: Key) -> None:
    response = call(client, token(es, claims([SIGN_URL, SELECT_URL])))
    assert response.status_code == 200


@pytest.mark.parametrize("alg", ["ES256", "ES512", "RS256", "RS512"])
def test_the_other_allowed_algorithms_are_accepted(make_client: AppFactory, alg: str) -> None:
    key = ec_key(alg) if alg.startswith("ES") else rsa_key(alg)
    client = make_client([{"iss": EHR, "jwks": jwks(key)}])
    assert call(client, token(key)).status_code == 200


def test_tenant_listed_for_the_issuer_is_accepted(client: FlaskClient, tenant_key: Key) -> None:
    response = call(client, token(tenant_key, claims(iss=TENANTED, tenant="tenant-2")))
    assert response.status_code == 200


def test_clock_skew_within_a_minute_is_tolerated(client: FlaskClient, es: Key) -> None:
    now = time.time()
    # Issued 30 s "in the future" by a fast EHR clock, and expired 30 s ago by ours: both inside the 60 s leeway.
    assert call(client, token(es, claims(now=now + 30))).status_code == 200
    assert call(client, token(es, claims(now=now - 330, lifetime=300))).status_code == 200


def test_discovery_and_health_need_no_token(client: FlaskClient) -> None:
    assert client.get("/cds-services").status_code == 200
    assert client.get("/health").status_code == 200


def test_accepted_call_records_who_called(client: FlaskClient, tenant_key: Key) -> None:
    payload = claims(iss=TENANTED, tenant="tenant-1", sub="client-app")
    identity = authenticator(client).verify(f"Bearer {token(tenant_key, payload)}", SELECT_URL)
    assert identity == Identity(
        iss=TENANTED, kid=tenant_key.kid, jti=payload["jti"], tenant="tenant-1", sub="client-app"
    )


# --- refused ---------------------------------------------------------------------------------------------------------

Forge = Callable[[Key, Key, Key], str]

REFUSED: dict[str, tuple[Forge, str]] = {
    "alg none": (
        lambda es, rs, tk: raw_token({"alg": "none", "typ": "JWT", "kid": es.kid}, claims()),
        "algorithm 'none' is not allowed",
    ),
    "HS256 signed with the public key": (
        lambda es, rs, tk: raw_token(
            {"alg": "HS256", "typ": "JWT", "kid": rs.kid}, claims(), hmac_secret=rs.public_pem()
        ),
        "algorithm 'HS256' is not allowed",
    ),
    "RSA-PSS is not on the list": (lambda es, rs, tk: token(rs, alg="PS384"), "algorithm 'PS384' is not allowed"),
    "wrong key under a trusted kid": (lambda es, rs, tk: token(ec_key("ES384", kid=es.kid)), "bad signature"),
    "wrong RSA key under a trusted kid": (
        lambda es, rs, tk: token(rsa_key("RS384", kid=rs.kid, slot=1)),
        "bad signature",
    ),
    "unknown kid": (lambda es, rs, tk: token(ec_key("ES384")), "unknown kid"),
    "key of another family": (lambda es, rs, tk: token(Key(es.private, rs.kid, "ES384")), "cannot verify ES384"),
    "curve does not fit the alg": (lambda es, rs, tk: token(ec_key("ES256", kid=es.kid)), "cannot verify ES256"),
    "unknown iss": (lambda es, rs, tk: token(es, claims(iss="https://evil.example.org")), "issuer is not trusted"),
    "iss differs in case": (lambda es, rs, tk: token(es, claims(iss=EHR.upper())), "issuer is not trusted"),
    "aud is another service": (lambda es, rs, tk: token(es, claims(SIGN_URL)), "aud does not name this endpoint"),
    "aud is the base URL": (lambda es, rs, tk: token(es, claims(PUBLIC_URL)), "aud does not name this endpoint"),
    "aud is http not https": (
        lambda es, rs, tk: token(es, claims(SELECT_URL.replace("https:", "http:"))),
        "aud does not name this endpoint",
    ),
    "aud has a trailing slash": (lambda es, rs, tk: token(es, claims(SELECT_URL + "/")), "aud does not name"),
    "aud is a prefix match": (lambda es, rs, tk: token(es, claims(SELECT_URL[:-3])), "aud does not name"),
    "aud list without the endpoint": (lambda es, rs, tk: token(es, claims([SIGN_URL, PUBLIC_URL])), "aud does not"),
    "aud is an object": (
        lambda es, rs, tk: token(es, claims({"url": SELECT_URL})),  # type: ignore[arg-type]
        "aud does not name",
    ),
    "expired": (lambda es, rs, tk: token(es, claims(now=time.time() - 600, lifetime=300)), "token expired"),
    "iat in the future": (lambda es, rs, tk: token(es, claims(now=time.time() + 300)), "iat is in the future"),
    "iat over an hour ago": (
        lambda es, rs, tk: token(es, claims(now=time.time() - 2 * 3600, lifetime=3 * 3600)),
        "iat is more than an hour ago",
    ),
    "nbf in the future": (lambda es, rs, tk: token(es, claims(nbf=int(time.time()) + 600)), "not valid yet"),
    "exp is a string": (lambda es, rs, tk: token(es, claims(exp="tomorrow")), "must be numbers"),
    "iat is a boolean": (lambda es, rs, tk: token(es, claims(iat=True)), "must be numbers"),
    "missing iss": (lambda es, rs, tk: token(es, claims(iss=None)), "missing claim iss"),  # type: ignore[arg-type]
    "missing aud": (lambda es, rs, tk: token(es, claims(None)), "missing claim aud"),  # type: ignore[arg-type]
    "missing exp": (lambda es, rs, tk: token(es, claims(exp=None)), "missing claim exp"),
    "missing iat": (lambda es, rs, tk: token(es, claims(iat=None)), "missing claim iat"),
    "missing jti": (lambda es, rs, tk: token(es, claims(jti=None)), "missing claim jti"),
    "jti is a number": (lambda es, rs, tk: token(es, claims(jti=12345)), "jti must be"),
    "jti too long": (lambda es, rs, tk: token(es, claims(jti="j" * 201)), "jti must be"),
    "no typ": (lambda es, rs, tk: token(es, typ=None), "typ is not JWT"),
    "typ is not JWT": (lambda es, rs, tk: token(es, typ="at+jwt"), "typ is not JWT"),
    "no kid": (lambda es, rs, tk: token(es, kid=None), "header has no kid"),
    "critical extension": (lambda es, rs, tk: token(es, crit=["exp"]), "critical extensions"),
    "jku although the issuer has no jwks_url": (
        lambda es, rs, tk: token(es, jku="https://ehr.example.org/jwks.json"),
        "is not this issuer's jwks_url",
    ),
    "tenant not listed": (lambda es, rs, tk: token(tk, claims(iss=TENANTED, tenant="tenant-9")), "tenant is not"),
    "tenant missing where tenants are listed": (lambda es, rs, tk: token(tk, claims(iss=TENANTED)), "tenant is not"),
    "tenant is not a string": (lambda es, rs, tk: token(tk, claims(iss=TENANTED, tenant=["tenant-1"])), "tenant must"),
    "not a JWT": (lambda es, rs, tk: "not-a-jwt", "malformed token"),
    "three garbage segments": (lambda es, rs, tk: "a.b.c", "malformed token"),
    "payload is an array": (
        lambda es, rs, tk: raw_token({"alg": "ES384", "typ": "JWT", "kid": es.kid}, []),
        "malformed",
    ),
    "deeply nested payload": (
        lambda es, rs, tk: raw_token(
            {"alg": "ES384", "typ": "JWT", "kid": es.kid}, b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}"
        ),
        "malformed token",
    ),
    "deeply nested header with a trusted kid": (
        # orjson reads it (depth < 1024) but PyJWT's json module would recurse past Python's limit.
        lambda es, rs, tk: raw_token(
            b'{"alg":"ES384","typ":"JWT","kid":"%s","x":%s}' % (es.kid.encode(), b"[" * 990 + b"]" * 990), claims()
        ),
        "token rejected",
    ),
    "exp beyond any float": (lambda es, rs, tk: token(es, claims(exp=10**400)), "malformed token"),
    "oversized token": (lambda es, rs, tk: token(es, claims(pad="x" * 9000)), "longer than 8192"),
}


def _unverified(tok: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the log line can name: the header and claims of a token that is at least readable JSON."""
    try:
        header, payload = (orjson.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in tok.split(".")[:2])
    except ValueError:
        return {}, {}
    return (header, payload) if isinstance(header, dict) and isinstance(payload, dict) else ({}, {})


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_tokens_get_a_bare_401_and_a_log_line_with_the_reason(
    client: FlaskClient, es: Key, rs: Key, tenant_key: Key, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    forge, reason = REFUSED[case]
    tok = forge(es, rs, tenant_key)
    with caplog.at_level(logging.INFO):
        response = call(client, tok)
    assert response.status_code == 401
    assert response.json == UNAUTHORIZED  # no reason for the client
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="cds-services"'
    assert response.mimetype == "application/json"
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "cds_service.web.hook_route" and r.levelno == logging.WARNING
    ]
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert reason in line
    header, payload = _unverified(tok) if len(tok) <= 8192 else ({}, {})
    for name, value in (("iss", payload.get("iss")), ("kid", header.get("kid")), ("jti", payload.get("jti"))):
        if isinstance(value, str):
            assert f"{name}={value[:128]}" in line  # untrusted values are logged cut short
    _assert_token_not_logged(tok, caplog)


def _assert_token_not_logged(tok: str, caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records)
    for part in tok.split("."):
        if len(part) > 8:
            assert part not in text


def test_replayed_jti_is_refused(client: FlaskClient, es: Key, caplog: pytest.LogCaptureFixture) -> None:
    tok = token(es)
    assert call(client, tok).status_code == 200
    with caplog.at_level(logging.WARNING):
        again = call(client, tok)
    assert again.status_code == 401
    assert "jti already used (replay)" in caplog.text
    # A new jti from the same client is fine.
    assert call(client, token(es)).status_code == 200


def test_same_jti_from_two_issuers_is_not_a_replay(client: FlaskClient, es: Key, tenant_key: Key) -> None:
    jti = str(uuid.uuid4())
    assert call(client, token(es, claims(jti=jti))).status_code == 200
    assert call(client, token(tenant_key, claims(iss=TENANTED, tenant="tenant-1", jti=jti))).status_code == 200


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc.def.ghi", "Bearer a b c", "Bearer \x7f"],
)
def test_missing_or_odd_authorization_header_is_refused(
    client: FlaskClient, header: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {} if header is None else {"Authorization": header}
    with caplog.at_level(logging.WARNING):
        response = client.post(SELECT, json=select_body(), headers=headers)
    assert response.status_code == 401
    assert response.json == UNAUTHORIZED
    assert "\n" not in "".join(r.getMessage() for r in caplog.records if r.name == "cds_service.web.hook_route")


def test_bearer_scheme_is_case_insensitive(client: FlaskClient, es: Key) -> None:
    response = client.post(SELECT, json=select_body(), headers={"Authorization": f"bearer {token(es)}"})
    assert response.status_code == 200


def test_untrusted_values_are_logged_printable_and_short(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    evil = ec_key("ES384", kid="kid\nFAKE LOG LINE" + "k" * 500)
    with caplog.at_level(logging.WARNING):
        assert call(client, token(evil, claims(iss="https://x\r\nFAKE", jti="j\x1b[31m"))).status_code == 401
    line = next(r.getMessage() for r in caplog.records if r.name == "cds_service.web.hook_route")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert len(line) < 600


def test_unauthenticated_calls_are_not_parsed(client: FlaskClient) -> None:
    # Authentication comes first: a stranger cannot make the service parse a body (nor learn what is wrong with it).
    response = client.post(SELECT, data=b"{not json", content_type="application/json")
    assert response.status_code == 401


def test_feedback_needs_a_token_for_the_feedback_url(client: FlaskClient, es: Key) -> None:
    if not any(r.rule == "/cds-services/<service_id>/feedback" for r in client.application.url_map.iter_rules()):
        pytest.fail("the feedback endpoint is missing")
    body = {
        "feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-05-04T10:15:00Z"}]
    }
    assert call(client, None, FEEDBACK, body).status_code == 401
    # A token for the service URL is not one for its feedback URL (aud is the exact endpoint).
    assert call(client, token(es, claims(SELECT_URL)), FEEDBACK, body).status_code == 401
    response = call(client, token(es, claims(f"{SELECT_URL}/feedback")), FEEDBACK, body)
    assert response.status_code == 200, response.json


def test_without_trusted_issuers_every_call_is_refused(
    tmp_path: Path, es: Key, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        app = create_app({"AUTH": "jwt", "PUBLIC_URL": PUBLIC_URL, "DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3"})
    assert "no client is trusted" in caplog.text
    client = app.test_client()
    assert call(client, token(es)).status_code == 401
    assert client.get("/cds-services").status_code == 200


def test_a_broken_issuers_file_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "issuers.json"
    path.write_text('{"issuers": [{"iss": "https://ehr.example.org"}]}')
    with pytest.raises(ConfigError, match="give 'jwks_url' or an inline 'jwks'"):
        create_app({"AUTH": "jwt", "TRUSTED_ISSUERS": str(path), "DATABASE_URL": f"sqlite:///{tmp_path}/x.sqlite3"})


# --- keys from a real JWKS server ------------------------------------------------------------------------------------


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


def test_jwks_url_keys_are_fetched_once_and_cached(make_client: AppFactory, jwks_server: JwksServer) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    client = make_client([{"iss": EHR, "jwks_url": jwks_server.url}])
    assert jwks_server.fetches == []  # nothing fetched at start-up
    for _ in range(3):
        assert call(client, token(key)).status_code == 200
    assert jwks_server.fetches == ["/jwks.json"]


def test_jku_equal_to_the_jwks_url_is_accepted(make_client: AppFactory, jwks_server: JwksServer) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    client = make_client([{"iss": EHR, "jwks_url": jwks_server.url}])
    assert call(client, token(key, jku=jwks_server.url)).status_code == 200


def test_unlisted_jku_is_refused_and_never_fetched(
    make_client: AppFactory, jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    client = make_client([{"iss": EHR, "jwks_url": jwks_server.url}])
    with JwksServer() as rogue:
        rogue.serve(key)
        for jku in (rogue.url, jwks_server.url + "?x=1", jwks_server.base + "/other.json"):
            with caplog.at_level(logging.WARNING):
                assert call(client, token(key, jku=jku)).status_code == 401
        assert rogue.fetches == []
    assert "is not this issuer's jwks_url" in caplog.text
    assert jwks_server.fetches == []  # refused before any key was needed


def test_rotated_key_is_picked_up_and_the_withdrawn_one_stops_working(
    make_client: AppFactory, jwks_server: JwksServer
) -> None:
    old, new = ec_key("ES384"), ec_key("ES384")
    jwks_server.serve(old)
    client = make_client([{"iss": EHR, "jwks_url": jwks_server.url}])
    clock = FakeClock()
    authenticator(client).clock = clock
    assert call(client, token(old, claims(now=clock.now))).status_code == 200
    jwks_server.serve(new)  # the EHR rotates: the old key is withdrawn
    # Within the minute after the last fetch, an unknown kid does not refetch.
    assert call(client, token(new, claims(now=clock.now))).status_code == 401
    assert len(jwks_server.fetches) == 1
    clock.advance(61)
    assert call(client, token(new, claims(now=clock.now))).status_code == 200
    assert len(jwks_server.fetches) == 2
    assert call(client, token(old, claims(now=clock.now))).status_code == 401


def test_unknown_kids_do_not_cause_a_fetch_storm(make_client: AppFactory, jwks_server: JwksServer) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    client = make_client([{"iss": EHR, "jwks_url": jwks_server.url}])
    clock = FakeClock()
    authenticator(client).clock = clock
    for _ in range(25):
        assert call(client, token(ec_key("ES384"), claims(now=clock.now))).status_code == 401
    assert len(jwks_server.fetches) == 1  # the first miss fetched; the rest waited for the minute
    clock.advance(30)
    for _ in range(25):
        assert call(client, token(ec_key("ES384"), claims(now=clock.now))).status_code == 401
    assert len(jwks_server.fetches) == 1
    clock.advance(31)
    for _ in range(25):
        assert call(client, token(ec_key("ES384"), claims(now=clock.now))).status_code == 401
    assert len(jwks_server.fetches) == 2
    # Known keys keep working throughout, without fetching.
    assert call(client, token(key, claims(now=clock.now))).status_code == 200
    assert len(jwks_server.fetches) == 2


def _verifier(issuer: TrustedIssuer, clock: FakeClock, store: Any = None) -> Authenticator:
    return Authenticator([issuer], store or MemoryJtiStore(), clock=clock)


def test_keys_are_refreshed_after_an_hour_so_withdrawn_keys_expire(jwks_server: JwksServer) -> None:
    old, new = ec_key("ES384"), ec_key("ES384")
    jwks_server.serve(old, new)
    clock = FakeClock()
    auth = _verifier(TrustedIssuer(EHR, jwks_url=jwks_server.url), clock)
    auth.verify(f"Bearer {token(old, claims(now=clock.now))}", SELECT_URL)
    jwks_server.serve(new)
    clock.advance(1800)
    auth.verify(f"Bearer {token(old, claims(now=clock.now))}", SELECT_URL)  # still cached
    clock.advance(1801)
    with pytest.raises(AuthError, match="unknown kid"):
        auth.verify(f"Bearer {token(old, claims(now=clock.now))}", SELECT_URL)
    auth.verify(f"Bearer {token(new, claims(now=clock.now))}", SELECT_URL)
    assert len(jwks_server.fetches) == 2


def test_unreachable_jwks_keeps_the_cached_keys(jwks_server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    clock = FakeClock()
    auth = _verifier(TrustedIssuer(EHR, jwks_url=jwks_server.url), clock)
    auth.verify(f"Bearer {token(key, claims(now=clock.now))}", SELECT_URL)
    jwks_server.status = 503
    clock.advance(3700)
    with caplog.at_level(logging.WARNING):
        auth.verify(f"Bearer {token(key, claims(now=clock.now))}", SELECT_URL)
    assert len(jwks_server.fetches) == 2
    assert "fetch failed (HTTP 503)" in caplog.text


def test_first_fetch_failing_refuses_and_does_not_retry_within_the_minute(jwks_server: JwksServer) -> None:
    key = ec_key("ES384")
    jwks_server.serve(key)
    jwks_server.status = 500
    clock = FakeClock()
    auth = _verifier(TrustedIssuer(EHR, jwks_url=jwks_server.url), clock)
    for _ in range(5):
        with pytest.raises(AuthError, match="unknown kid"):
            auth.verify(f"Bearer {token(key, claims(now=clock.now))}", SELECT_URL)
    assert len(jwks_server.fetches) == 1
    jwks_server.status = 200
    clock.advance(60)
    auth.verify(f"Bearer {token(key, claims(now=clock.now))}", SELECT_URL)


def test_jwks_fetch_has_a_timeout() -> None:
    with JwksServer(stall=True) as server:
        with pytest.raises(JwksFetchError, match="ReadTimeout"):
            fetch_jwks(server.url, timeout=0.2)
        assert server.fetches == ["/jwks.json"]


@pytest.mark.parametrize(
    ("status", "document", "problem"),
    [
        (302, {"keys": []}, "HTTP 302"),  # no redirects: the allowlisted URL is the only place keys come from
        (404, {}, "HTTP 404"),
        (200, b"<html>", "not JSON"),
        (200, b"[" * 300 * 1024, "larger than"),
    ],
)
def test_jwks_fetch_refuses_what_is_not_a_small_jwks(status: int, document: Any, problem: str) -> None:
    with JwksServer(document=document, status=status) as server, pytest.raises(JwksFetchError, match=problem):
        fetch_jwks(server.url)


def test_bad_keys_in_a_fetched_jwks_are_skipped(jwks_server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    good = ec_key("ES384")
    private = ec_key("ES384")
    private_jwk = private.jwk()
    private_jwk["d"] = "AAAA"
    jwks_server.document = {
        "keys": [
            private_jwk,
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            rsa_key("RS256", bits=1024).jwk(),
            {**ec_key("ES384").jwk(), "use": "enc"},
            {**ec_key("ES384").jwk(), "alg": "ES256"},
            {"kty": "EC", "kid": "broken", "crv": "P-384", "x": 5, "y": "?"},
            "not a key",
            good.jwk(),
        ]
    }
    with caplog.at_level(logging.WARNING):
        keys = fetch_jwks(jwks_server.url)
    assert list(keys) == [good.kid]
    for note in (
        "holds a private key",
        "not EC or RSA",
        "shorter than 2048",
        "not 'sig'",
        "does not fit",
        "unreadable",
    ):
        assert note in caplog.text


# --- the verifier on its own -----------------------------------------------------------------------------------------


class RecordingJtiStore:
    """A JtiStore that keeps what it was asked (any JtiStore must do; the database one is another engineer's)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        seen = any(c[:2] == (iss, jti) for c in self.calls)
        self.calls.append((iss, jti, expires_at))
        return not seen


def test_jti_is_remembered_until_the_token_can_no_longer_be_accepted(es: Key) -> None:
    clock = FakeClock()
    store = RecordingJtiStore()
    auth = _verifier(TrustedIssuer(EHR, keys=parse_jwks(jwks(es))[0]), clock, store)
    short = claims(now=clock.now, lifetime=300)
    auth.verify(f"Bearer {token(es, short)}", SELECT_URL)
    long = claims(now=clock.now, lifetime=24 * 3600)
    auth.verify(f"Bearer {token(es, long)}", SELECT_URL)
    assert store.calls == [
        (EHR, short["jti"], short["exp"] + 60),
        # A day-long token is refused after an hour (iat limit), so its jti need not be kept longer.
        (EHR, long["jti"], long["iat"] + 3600 + 60),
    ]


def test_jti_store_is_asked_only_after_everything_else_passed(es: Key) -> None:
    store = RecordingJtiStore()
    auth = _verifier(TrustedIssuer(EHR, keys=parse_jwks(jwks(es))[0]), FakeClock(), store)
    with pytest.raises(AuthError):
        auth.verify(f"Bearer {token(ec_key('ES384', kid=es.kid))}", SELECT_URL)
    with pytest.raises(AuthError):
        auth.verify(f"Bearer {token(es, claims(SIGN_URL))}", SELECT_URL)
    assert store.calls == []  # a forged or misdirected token cannot burn a jti


def test_memory_jti_store_forgets_expired_entries() -> None:
    store = MemoryJtiStore()
    assert store.remember(EHR, "a", time.time() + 60)
    assert not store.remember(EHR, "a", time.time() + 60)
    assert store.remember(EHR, "b", time.time() - 1)
    assert store.remember(EHR, "b", time.time() + 60)  # the earlier entry had expired


def test_jwk_without_alg_verifies_any_rsa_algorithm(rs: Key) -> None:
    keys, _ = parse_jwks({"keys": [rs.jwk(with_alg=False)]})
    auth = _verifier(TrustedIssuer(EHR, keys=keys), FakeClock())
    for alg in ("RS256", "RS384", "RS512"):
        auth.verify(f"Bearer {token(Key(rs.private, rs.kid, alg))}", SELECT_URL)


def test_typ_is_compared_without_case(es: Key) -> None:
    auth = _verifier(TrustedIssuer(EHR, keys=parse_jwks(jwks(es))[0]), FakeClock())
    auth.verify(f"Bearer {token(es, typ='jwt')}", SELECT_URL)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({}, 'expected {"issuers": [...]}'),
        ({"issuers": [{"jwks_url": "https://a.example.org/jwks.json"}]}, "'iss' must be a non-empty string"),
        ({"issuers": [{"iss": "https://a.example.org"}]}, "give 'jwks_url' or an inline 'jwks'"),
        (
            {"issuers": [{"iss": "a", "jwks_url": "https://a/j"}, {"iss": "a", "jwks_url": "https://a/j"}]},
            "listed twice",
        ),
        ({"issuers": [{"iss": "a", "jwks_url": "http://a.example.org/j"}]}, "must be an https URL"),
        ({"issuers": [{"iss": "a", "jwks_uri": "https://a/j"}]}, "unknown field(s) jwks_uri"),
        ({"issuers": [{"iss": "a", "jwks_url": "https://a/j", "tenants": []}]}, "'tenants' must be a non-empty"),
        ({"issuers": [{"iss": "a", "jwks": {"keys": []}}]}, "inline jwks holds no keys"),
        ({"issuers": [{"iss": "a", "jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "eA"}]}}]}, "not EC or RSA"),
        ({"issuers": ["https://a.example.org"]}, "expected an object"),
    ],
)
def test_issuers_file_mistakes_are_named(document: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_issuers(document)
    assert problem in str(caught.value)


def test_issuers_file_allows_http_jwks_url_on_this_machine_only() -> None:
    for url in ("http://127.0.0.1:8000/jwks.json", "http://localhost/jwks.json", "http://[::1]:9/j"):
        assert parse_issuers({"issuers": [{"iss": "a", "jwks_url": url}]})[0].jwks_url == url


def test_issuers_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_issuers(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_issuers(tmp_path / "bad.json")


def test_inline_private_key_is_refused_at_start_up(es: Key) -> None:
    private = es.jwk()
    private["d"] = "AAAA"
    with pytest.raises(ConfigError, match="holds a private key"):
        parse_issuers({"issuers": [{"iss": EHR, "jwks": {"keys": [private]}}]})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "jku", "crit", "x5u", "jwk"]), _json, max_size=4),
    payload=st.dictionaries(
        st.sampled_from(["iss", "aud", "exp", "iat", "nbf", "jti", "tenant", "sub"]), _json, max_size=8
    ),
    keep=st.booleans(),
)
def test_verifier_answers_any_token_with_an_identity_or_an_auth_error(
    es: Key, header: dict[str, Any], payload: dict[str, Any], keep: bool
) -> None:
    """Whatever the header and claims (correctly signed, or with their values merged into a valid token)."""
    auth = _verifier(TrustedIssuer(EHR, keys=parse_jwks(jwks(es))[0]), FakeClock())
    base_header: dict[str, Any] = {"typ": "JWT", "kid": es.kid, "alg": "ES384"}
    body = {**claims(), **payload} if keep else payload
    head = {**base_header, **header}
    if head.get("alg") == "ES384":
        try:
            tok = jwt.encode(body, es.private, algorithm="ES384", headers={k: v for k, v in head.items() if k != "alg"})
        except (TypeError, ValueError, jwt.PyJWTError):
            tok = raw_token(head, body)
    else:
        tok = raw_token(head, body)
    try:
        identity = auth.verify(f"Bearer {tok}", SELECT_URL)
    except AuthError as exc:
        assert exc.reason
        return
    assert identity.iss == EHR and identity.kid == es.kid


_jwk_field = st.sampled_from(["kty", "kid", "crv", "x", "y", "n", "e", "d", "alg", "use", "k"])


@settings(max_examples=300, deadline=None)
@given(
    document=st.one_of(
        _json,
        st.fixed_dictionaries({"keys": st.lists(st.dictionaries(_jwk_field, _json, max_size=8), max_size=3)}),
        st.fixed_dictionaries(
            {"issuers": st.lists(st.dictionaries(st.sampled_from(["iss", "jwks_url", "jwks", "tenants"]), _json))}
        ),
    )
)
def test_any_jwks_or_issuers_document_is_read_or_refused_by_name(document: Any) -> None:
    keys, skipped = parse_jwks(document)
    assert isinstance(keys, dict) and isinstance(skipped, list)
    try:
        parse_issuers(document)
    except ConfigError as exc:
        assert str(exc).startswith("CDS_TRUSTED_ISSUERS")
