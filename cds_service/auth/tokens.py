"""CDS Hooks client authentication: bearer JWTs from allowlisted issuers, checked as CDS Hooks 2.0 requires."""

from __future__ import annotations

import base64
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
import orjson
import requests
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..audit import Identity
from ..config import ConfigError

log = logging.getLogger(__name__)

# CDS Hooks 2.0 "Trusted CDS Clients": asymmetric signatures only; `none` and every HMAC algorithm are forbidden
# (an HMAC "signed" with a public key is the classic key-confusion forgery). ES384 and RS384 are the recommended ones.
ALGORITHMS: frozenset[str] = frozenset({"ES256", "ES384", "ES512", "RS256", "RS384", "RS512"})
# The curve each ECDSA algorithm is defined on (RFC 7518 section 3.4).
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
REQUIRED_CLAIMS: tuple[str, ...] = ("iss", "aud", "exp", "iat", "jti")
LEEWAY = 60.0  # seconds of clock skew tolerated on exp, iat and nbf
MAX_TOKEN_AGE = 3600.0  # iat older than an hour is refused: the spec bounds a token's lifetime (and jti memory) so
REFETCH_INTERVAL = 60.0  # an unknown kid refetches the issuer's JWKS at most this often
KEYS_MAX_AGE = 3600.0  # fetched keys are refreshed after this long, so a key the issuer withdrew stops working
FETCH_TIMEOUT = 5.0  # seconds for the whole JWKS fetch, connect to last byte
MAX_JWKS_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 8192  # real CDS Hooks tokens are under 1 KB; gunicorn caps a header line at 8190 anyway
_MAX_CLAIM_CHARS = 200  # jti, tenant: longer values are refused rather than stored (or cut by a store)
_LOG_CHARS = 128


class AuthError(Exception):
    """The call is not authenticated. `reason` is for the server log only; clients get a bare 401."""

    def __init__(
        self,
        reason: str,
        *,
        iss: str | None = None,
        kid: str | None = None,
        jti: str | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.identity = Identity(iss=iss, kid=kid, jti=jti, tenant=tenant)


class JtiStore(Protocol):
    """Remembers token ids until their tokens expire, shared by every worker that may see the same token."""

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        """Record (iss, jti) until `expires_at` (epoch seconds); False when it was already there (a replay)."""
        ...


# --- trusted issuers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """One public key from an issuer's JWK Set, with what the JWK says it may be used for."""

    kid: str
    kty: str  # EC or RSA
    crv: str | None
    alg: str | None
    key: EllipticCurvePublicKey | RSAPublicKey

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a token signed with `alg` (family, curve and any declared alg agree)."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith("ES"):
            return self.kty == "EC" and self.crv == _EC_CURVES[alg]
        return self.kty == "RSA"


def parse_jwks(document: Any) -> tuple[dict[str, VerificationKey], list[str]]:
    """The usable signing keys of a JWK Set by kid, and one note per key that was skipped and why."""
    keys: dict[str, VerificationKey] = {}
    skipped: list[str] = []
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return keys, ["not a JWK Set: no 'keys' array"]
    for index, jwk in enumerate(entries):
        where = f"key {index}"
        if not isinstance(jwk, dict):
            skipped.append(f"{where}: not an object")
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            skipped.append(f"{where}: no kid")
            continue
        where = f"key {kid[:_LOG_CHARS]!r}"
        problem = _jwk_problem(jwk)
        if problem is None and kid in keys:
            problem = "duplicate kid"
        if problem is None:
            try:
                key = _public_key(jwk)
            except Exception as exc:  # malformed key material: skip this key, keep the others usable
                problem = f"unreadable ({type(exc).__name__})"
        if problem is not None:
            skipped.append(f"{where}: {problem}")
            continue
        if isinstance(key, RSAPublicKey) and key.key_size < 2048:
            skipped.append(f"{where}: RSA key shorter than 2048 bits")
            continue
        alg = jwk.get("alg")
        keys[kid] = VerificationKey(kid, jwk["kty"], jwk.get("crv"), alg if isinstance(alg, str) else None, key)
    return keys, skipped


def _jwk_problem(jwk: dict[str, Any]) -> str | None:
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"use is {str(use)[:20]!r}, not 'sig'"
    if "d" in jwk:
        # A private key in a key set is a leak at the issuer: refuse to treat it as a trust anchor.
        return "holds a private key"
    kty = jwk.get("kty")
    if kty not in ("EC", "RSA"):
        return f"key type {str(kty)[:20]!r} is not EC or RSA"
    if kty == "EC" and jwk.get("crv") not in _EC_CURVES.values():
        return f"curve {str(jwk.get('crv'))[:20]!r} is not P-256, P-384 or P-521"
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            return f"alg {str(alg)[:20]!r} is not one of {', '.join(sorted(ALGORITHMS))}"
        if alg.startswith("ES") != (kty == "EC") or (kty == "EC" and _EC_CURVES[alg] != jwk.get("crv")):
            return f"alg {alg} does not fit a {kty} {jwk.get('crv') or ''} key".replace("  ", " ")
    return None


def _public_key(jwk: dict[str, Any]) -> EllipticCurvePublicKey | RSAPublicKey:
    key = ECAlgorithm.from_jwk(jwk) if jwk["kty"] == "EC" else RSAAlgorithm.from_jwk(jwk)
    if not isinstance(key, EllipticCurvePublicKey | RSAPublicKey):
        raise TypeError("not a public key")
    return key


@dataclass(frozen=True)
class TrustedIssuer:
    """One allowlisted client (`iss`): where its keys come from and which tenants it may name."""

    iss: str
    jwks_url: str | None = None
    keys: Mapping[str, VerificationKey] | None = None  # inline JWK Set: used as is, never fetched
    tenants: frozenset[str] | None = None


_ISSUER_FIELDS = {"iss", "jwks_url", "jwks", "tenants", "description"}


def parse_issuers(document: Any, source: str = "CDS_TRUSTED_ISSUERS") -> list[TrustedIssuer]:
    """The issuers file, checked: `{"issuers": [{iss, jwks_url?, jwks?, tenants?, description?}]}`."""
    entries = document.get("issuers") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'{source}: expected {{"issuers": [...]}}')
    issuers: list[TrustedIssuer] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{source}: issuers[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = sorted(set(entry) - _ISSUER_FIELDS)
        if unknown:
            known = ", ".join(sorted(_ISSUER_FIELDS))
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {known}")
        iss = entry.get("iss")
        if not isinstance(iss, str) or not iss.strip():
            raise ConfigError(f"{where}: 'iss' must be a non-empty string")
        where = f"{source}: issuer {iss!r}"
        if iss in seen:
            raise ConfigError(f"{where}: listed twice")
        seen.add(iss)
        jwks_url = entry.get("jwks_url")
        if jwks_url is not None:
            _check_jwks_url(jwks_url, where)
        keys: dict[str, VerificationKey] | None = None
        if "jwks" in entry:
            keys, skipped = parse_jwks(entry["jwks"])
            if skipped:
                raise ConfigError(f"{where}: inline jwks: {'; '.join(skipped)}")
            if not keys:
                raise ConfigError(f"{where}: inline jwks holds no keys")
        elif jwks_url is None:
            raise ConfigError(f"{where}: give 'jwks_url' or an inline 'jwks'")
        tenants = entry.get("tenants")
        if tenants is not None and (
            not isinstance(tenants, list) or not tenants or not all(isinstance(t, str) and t for t in tenants)
        ):
            raise ConfigError(f"{where}: 'tenants' must be a non-empty list of strings (omit it to allow any)")
        issuers.append(
            TrustedIssuer(iss, jwks_url, keys, frozenset(tenants) if tenants is not None else None),
        )
    return issuers


def _check_jwks_url(url: Any, where: str) -> None:
    if not isinstance(url, str):
        raise ConfigError(f"{where}: 'jwks_url' must be a string")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    # Plain http only to this machine (a local test EHR): keys fetched over the network must be authenticated.
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ConfigError(f"{where}: 'jwks_url' must be an https URL (http only for localhost), got {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_issuers(path: str | Path) -> list[TrustedIssuer]:
    """Read and check the CDS_TRUSTED_ISSUERS file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"CDS_TRUSTED_ISSUERS: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"CDS_TRUSTED_ISSUERS: {path} is not valid JSON: {exc}") from exc
    return parse_issuers(document, f"CDS_TRUSTED_ISSUERS ({path})")


# --- key sets -------------------------------------------------------------------------------------------------------


class JwksFetchError(Exception):
    """An issuer's JWK Set could not be fetched or read."""


def fetch_jwks(url: str, timeout: float = FETCH_TIMEOUT) -> dict[str, VerificationKey]:
    """GET an allowlisted JWKS URL: no redirects, bounded in size and in total time."""
    deadline = time.monotonic() + timeout
    try:
        with requests.get(
            url, timeout=timeout, allow_redirects=False, stream=True, headers={"Accept": "application/json"}
        ) as response:
            if response.status_code != 200:
                raise JwksFetchError(f"HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_content(16384):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksFetchError(f"larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise JwksFetchError(f"took longer than {timeout:g} s")
    except requests.RequestException as exc:
        raise JwksFetchError(type(exc).__name__) from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise JwksFetchError("not JSON") from None
    keys, skipped = parse_jwks(document)
    if skipped:
        log.warning("JWKS %s: skipped %s", url, "; ".join(skipped))
    return keys


class IssuerKeys:
    """An issuer's keys: the inline set, or its jwks_url fetched lazily, cached, and refetched at a bounded rate."""

    def __init__(
        self,
        issuer: TrustedIssuer,
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[str], dict[str, VerificationKey]] = fetch_jwks,
        refetch_interval: float = REFETCH_INTERVAL,
        max_age: float = KEYS_MAX_AGE,
    ) -> None:
        self.issuer = issuer
        self._clock = clock
        self._fetch = fetch
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._keys: Mapping[str, VerificationKey] = issuer.keys or {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = threading.Lock()

    def get(self, kid: str) -> VerificationKey | None:
        """The key for `kid`; a miss (or stale keys) triggers at most one fetch per refetch interval."""
        url = self.issuer.jwks_url
        if self.issuer.keys is not None or url is None:
            return self._keys.get(kid)
        key = self._keys.get(kid)
        if key is not None and not self._stale():
            return key
        # A known key whose set is merely stale is still served while another thread refreshes it.
        if not self._lock.acquire(blocking=key is None):
            return key
        try:
            now = self._clock()
            wanted = self._keys.get(kid) is None or self._stale()
            if wanted and (self._attempted_at is None or now - self._attempted_at >= self._refetch_interval):
                self._attempted_at = now
                self._refresh(url, now)
            return self._keys.get(kid)
        finally:
            self._lock.release()

    def _stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at > self._max_age

    def _refresh(self, url: str, now: float) -> None:
        try:
            self._keys = self._fetch(url)
        except JwksFetchError as exc:
            # Keep the keys we had: an unreachable JWKS must not lock out a client whose key we already know.
            log.warning(
                "JWKS for issuer %s from %s: fetch failed (%s); keeping %d cached keys",
                self.issuer.iss,
                url,
                exc,
                len(self._keys),
            )
            return
        self._fetched_at = now
        log.info("JWKS for issuer %s from %s: %d keys", self.issuer.iss, url, len(self._keys))


# --- verification ---------------------------------------------------------------------------------------------------


def _loggable(value: Any) -> str | None:
    """An untrusted header or claim value made safe for a log line: short, printable, never a structure dump."""
    if value is None:
        return None
    text = value if isinstance(value, str) else type(value).__name__
    text = text[:_LOG_CHARS]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _number(value: Any) -> float | None:
    """A NumericDate (RFC 7519): a finite number. NaN would slip past every comparison, so it is not one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past any float: not a time
            return None
        return number if math.isfinite(number) else None
    return None


class Authenticator:
    """Checks `Authorization: Bearer <JWT>` as CDS Hooks 2.0 ("Trusted CDS Clients") and its best practices say."""

    def __init__(
        self,
        issuers: Iterable[TrustedIssuer],
        jti_store: JtiStore,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str], dict[str, VerificationKey]] = fetch_jwks,
        refetch_interval: float = REFETCH_INTERVAL,
    ) -> None:
        self.jti_store = jti_store
        self.clock = clock  # epoch seconds; one clock for token times and the JWKS refetch limit

        def now() -> float:
            return self.clock()

        self.issuers: dict[str, IssuerKeys] = {
            i.iss: IssuerKeys(i, clock=now, fetch=fetch, refetch_interval=refetch_interval) for i in issuers
        }

    def verify(self, authorization: str | None, audience: str) -> Identity:
        """The caller's identity, or AuthError (with a reason for the log) when the token must be refused.

        `audience` is the exact public URL of the endpoint called: the token's `aud` must name it.
        """
        token = _bearer_token(authorization)
        try:
            header, unverified = _peek(token)
        except ValueError:
            raise AuthError("malformed token") from None
        claimed_iss = unverified.get("iss")
        who = {
            "iss": _loggable(claimed_iss),
            "kid": _loggable(header.get("kid")),
            "jti": _loggable(unverified.get("jti")),
            "tenant": _loggable(unverified.get("tenant")),
        }

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError(f"algorithm {_loggable(alg)!r} is not allowed", **who)
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.upper() != "JWT":
            raise AuthError("header typ is not JWT", **who)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("header has no kid", **who)
        if "crit" in header:
            # RFC 7515 section 4.1.11: a recipient must refuse extensions it does not understand (this one knows none).
            raise AuthError("header names critical extensions this service does not implement", **who)
        if not isinstance(claimed_iss, str):
            raise AuthError("missing claim iss" if claimed_iss is None else "claim iss is not a string", **who)
        keys = self.issuers.get(claimed_iss)
        if keys is None:
            raise AuthError("issuer is not trusted", **who)
        issuer = keys.issuer
        if "jku" in header and (issuer.jwks_url is None or header["jku"] != issuer.jwks_url):
            # Never fetched: a token must not choose where its own verification keys come from.
            raise AuthError(f"jku {_loggable(header['jku'])!r} is not this issuer's jwks_url", **who)
        key = keys.get(kid)
        if key is None:
            raise AuthError("unknown kid for this issuer", **who)
        if not key.fits(alg):
            raise AuthError(f"the key for this kid cannot verify {alg}", **who)

        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                # Claims are checked below, with this authenticator's clock and reasons.
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature", **who) from None
        except (jwt.PyJWTError, ValueError, RecursionError) as exc:
            # PyJWT reads the token again with the json module, which recurses where orjson does not.
            raise AuthError(f"token rejected ({type(exc).__name__})", **who) from None
        return self._check_claims(claims, issuer, audience, kid, who)

    def _check_claims(
        self, claims: dict[str, Any], issuer: TrustedIssuer, audience: str, kid: str, who: dict[str, str | None]
    ) -> Identity:
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise AuthError(f"missing claim {name}", **who)
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or audience not in audiences:
            raise AuthError(f"aud does not name this endpoint ({audience})", **who)

        now = self.clock()
        exp, iat, nbf = _number(claims["exp"]), _number(claims["iat"]), _number(claims.get("nbf"))
        if exp is None or iat is None or ("nbf" in claims and nbf is None):
            raise AuthError("exp, iat and nbf must be numbers (seconds since the epoch)", **who)
        if exp <= now - LEEWAY:
            raise AuthError("token expired", **who)
        if iat > now + LEEWAY:
            raise AuthError("iat is in the future", **who)
        if iat < now - MAX_TOKEN_AGE - LEEWAY:
            raise AuthError("iat is more than an hour ago", **who)
        if nbf is not None and nbf > now + LEEWAY:
            raise AuthError("token not valid yet (nbf)", **who)

        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_CLAIM_CHARS or not jti.isprintable():
            raise AuthError(f"jti must be 1 to {_MAX_CLAIM_CHARS} printable characters", **who)
        tenant = claims.get("tenant")
        if tenant is not None and (not isinstance(tenant, str) or len(tenant) > _MAX_CLAIM_CHARS):
            raise AuthError(f"tenant must be a string of at most {_MAX_CLAIM_CHARS} characters", **who)
        if issuer.tenants is not None and tenant not in issuer.tenants:
            raise AuthError("tenant is not allowed for this issuer", **who)

        # Remember the jti for as long as the token could be accepted: until exp, but no longer than the age limit.
        expires_at = min(exp, iat + MAX_TOKEN_AGE) + LEEWAY
        if not self.jti_store.remember(issuer.iss, jti, expires_at):
            raise AuthError("jti already used (replay)", **who)
        sub = claims.get("sub")
        return Identity(iss=issuer.iss, kid=kid, jti=jti, tenant=tenant, sub=sub if isinstance(sub, str) else None)


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A compact JWS's header and claims, unverified: enough to find the issuer and key. PyJWT then verifies it.

    One fast look instead of PyJWT's get_unverified_header plus an unverified decode, which each re-validate the
    whole token character by character in Python (about 100 us apiece). Where this reading and PyJWT's could
    differ (characters outside base64url, NaN), PyJWT refuses the token, so nothing accepted depends on it.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    header, claims = orjson.loads(_b64url(parts[0])), orjson.loads(_b64url(parts[1]))
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("header and claims must be JSON objects")
    return header, claims


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(f"Authorization scheme {_loggable(scheme[:20])!r} is not Bearer")
    token = token.strip()
    if not token:
        raise AuthError("empty bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(f"bearer token longer than {MAX_TOKEN_CHARS} characters")
    return token


def build_authenticator(path: str | None, jti_store: JtiStore) -> Authenticator:
    """The authenticator for CDS_AUTH=jwt, trusting the issuers in the CDS_TRUSTED_ISSUERS file (`path`)."""
    if not path:
        # Fail closed rather than refuse to start: the service answers discovery and /health, and 401 to every call.
        log.warning("CDS_AUTH=jwt without CDS_TRUSTED_ISSUERS: no client is trusted, every service call gets 401")
        return Authenticator([], jti_store)
    issuers = load_issuers(path)
    log.info("trusting %d JWT issuer(s): %s", len(issuers), ", ".join(i.iss for i in issuers))
    return Authenticator(issuers, jti_store)
