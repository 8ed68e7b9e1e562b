"""CDS Hooks client authentication: the interface the web layer uses (JWT checking lands with its own issue)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Identity:
    """Who called: safe to log and audit (never the token itself)."""

    iss: str | None = None
    kid: str | None = None
    jti: str | None = None
    tenant: str | None = None
    sub: str | None = None


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


class MemoryJtiStore:
    """In-process jti store: correct for one process only (tests, `flask run`, the SQLite default)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def remember(self, iss: str, jti: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            if len(self._seen) > 10000:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            key = (iss, jti)
            if self._seen.get(key, 0) > now:
                return False
            self._seen[key] = expires_at
            return True


class Authenticator:
    """Placeholder until JWT verification exists: in `jwt` mode every service call is refused."""

    def verify(self, authorization: str | None, audience: str) -> Identity:
        raise AuthError("JWT verification is not available in this build")


def build_authenticator(settings: dict[str, Any], jti_store: JtiStore) -> Authenticator:
    """The authenticator for CDS_AUTH=jwt, from CDS_TRUSTED_ISSUERS (placeholder: refuses every call)."""
    return Authenticator()
