"""Test helpers for CDS Hooks JWTs: keys made here, signed tokens, raw forged tokens, and a real JWKS server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PUBLIC_URL = "https://cds.example.org"
EHR = "https://ehr.example.org"
SELECT_URL = f"{PUBLIC_URL}/cds-services/dsv-order-select"
SIGN_URL = f"{PUBLIC_URL}/cds-services/dsv-order-sign"

_CURVES: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass(frozen=True)
class Key:
    """A private signing key made for the tests, its kid and algorithm, and its public JWK."""

    private: Any
    kid: str
    alg: str

    def jwk(self, *, with_alg: bool = True) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        out: dict[str, Any] = dict(algorithm.to_jwk(public, as_dict=True))
        out.update(kid=self.kid, use="sig")
        if with_alg:
            out["alg"] = self.alg
        return out

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem


@cache
def _rsa(bits: int, slot: int) -> rsa.RSAPrivateKey:
    # RSA generation is slow (~0.1 s): one key per (size, slot) per test run.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(alg: str = "ES384", kid: str | None = None) -> Key:
    return Key(ec.generate_private_key(_CURVES[alg]()), kid or f"ec-{uuid.uuid4()}", alg)


def rsa_key(alg: str = "RS384", kid: str | None = None, *, bits: int = 2048, slot: int = 0) -> Key:
    return Key(_rsa(bits, slot), kid or f"rsa-{uuid.uuid4()}", alg)


def jwks(*keys: Key) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def claims(
    aud: str | list[str] = SELECT_URL, *, iss: str = EHR, now: float | None = None, lifetime: float = 300, **extra: Any
) -> dict[str, Any]:
    """Valid CDS Hooks claims for `aud`; pass a claim as None to leave it out."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "exp": int(now + lifetime),
        "iat": int(now),
        "jti": str(uuid.uuid4()),
    }
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def token(key: Key, payload: dict[str, Any] | None = None, *, alg: str | None = None, **header: Any) -> str:
    """A token signed by `key` with PyJWT; header fields given as None are left out (typ defaults to JWT)."""
    fields: dict[str, Any] = {"typ": "JWT", "kid": key.kid}
    fields.update(header)
    # PyJWT leaves out a typ given as None (and adds typ JWT when none is given); other None fields are dropped here.
    fields = {k: v for k, v in fields.items() if v is not None or k == "typ"}
    body = claims() if payload is None else payload
    return jwt.encode(body, key.private, algorithm=alg or key.alg, headers=fields)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: Any, payload: Any, *, hmac_secret: bytes | None = None) -> str:
    """A compact JWS built by hand (for forgeries PyJWT refuses to make): unsigned, or HMAC-SHA256 with a secret.

    `header` and `payload` are JSON-encoded, or used as they are when given as bytes.
    """
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{_b64(head)}.{_b64(body)}"
    signature = b""
    if hmac_secret is not None:
        signature = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def issuers_file(path: Path, issuers: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"issuers": issuers}))
    return path


@dataclass
class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JWK Set that tests can rotate; counts what it was asked for."""

    document: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    stall: bool = False  # hold every answer until the server stops (for timeout tests)
    fetches: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.fetches.append(self.path)
                    document, status = server.document, server.status
                if server.stall:
                    server._release.wait(10)
                body = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere.json")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        return f"{self.base}/jwks.json"

    def serve(self, *keys: Key) -> None:
        with self._lock:
            self.document = jwks(*keys)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class FakeClock:
    """A clock the test moves by hand (the authenticator's refetch limit is a minute; tests do not wait one)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
