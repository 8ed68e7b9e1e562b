"""A bench-only EHR identity: a key it generates, the trusted-issuers file naming it, and pools of signed tokens."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://bench-ehr.example.org"
KID = "bench-key-1"
# The algorithms CDS Hooks clients use (the sandbox signs ES384; many EHRs sign RS384); ES256 is the cheapest.
ALGORITHMS = ("ES384", "RS384", "ES256")
# Tokens live long enough for a pool made before a load run to be used up during it (CDS Hooks: short-lived).
LIFETIME_S = 600


@dataclass(frozen=True)
class Signer:
    alg: str
    private_pem: bytes
    jwk: dict[str, Any]


def make_signer(alg: str) -> Signer:
    if alg == "ES384":
        key: Any = ec.generate_private_key(ec.SECP384R1())
    elif alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unsupported algorithm {alg}")
    algo = jwt.algorithms.ECAlgorithm if alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
    jwk = json.loads(algo.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": alg, "use": "sig"})
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Signer(alg, pem, jwk)


def write_trusted_issuers(signer: Signer, path: Path) -> Path:
    """CDS_TRUSTED_ISSUERS as issue 4 defines it: the bench's issuer with its JWKS inline (nothing fetched)."""
    path.write_text(json.dumps({"issuers": [{"iss": ISSUER, "jwks": {"keys": [signer.jwk]}}]}, indent=2))
    return path


def _sign_batch(args: tuple[bytes, str, str, int]) -> list[str]:
    pem, alg, audience, count = args
    key = serialization.load_pem_private_key(pem, password=None)
    now = int(time.time())
    headers = {"kid": KID, "typ": "JWT"}
    out = []
    for _ in range(count):
        claims = {
            "iss": ISSUER,
            "sub": ISSUER,
            "aud": audience,
            "iat": now,
            "exp": now + LIFETIME_S,
            "jti": uuid.uuid4().hex,
        }
        out.append(jwt.encode(claims, key, algorithm=alg, headers=headers))  # type: ignore[arg-type]
    return out


def sign_pool(signer: Signer, audience: str, count: int, *, processes: int = 2) -> list[str]:
    """`count` tokens, each with its own jti, signed in `processes` processes (signing is not what is measured)."""
    if count <= 0:
        return []
    share = -(-count // processes)
    jobs = [(signer.private_pem, signer.alg, audience, min(share, count - i * share)) for i in range(processes)]
    jobs = [j for j in jobs if j[3] > 0]
    if len(jobs) == 1:
        return _sign_batch(jobs[0])
    with ProcessPoolExecutor(len(jobs)) as pool:
        return [token for batch in pool.map(_sign_batch, jobs) for token in batch]
