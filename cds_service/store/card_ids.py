"""Card uuids this service recognises as its own without the database: uuid4-shaped, the random half tagged by HMAC.

Feedback can reach a worker (or an instance) before the card's audit record has left the queue of the worker that
answered; looking the card up in the audit log then finds nothing. So each card uuid carries its own proof: 64 bits
of its 128 are HMAC-SHA256(key, service id + the other 64) cut to fit, under a key every worker and instance shares
(CDS_CARD_ID_KEY, or a secret made once in the database). The uuid stays a valid version-4 uuid (version nibble 4,
variant 10): 60 random bits and a 62-bit tag, so a forged or foreign uuid passes with odds of 2^-62.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from .audit_writer import insert_ignoring_duplicates
from .db import Database, StoreUnavailable, short_error
from .models import service_secret

log = logging.getLogger(__name__)

_KEY_ROW = "card-id-key"
_RETRY_AFTER = 30.0  # seconds between attempts to read the key while the database is down


def _tag(key: bytes, service_id: str, nonce: bytes) -> bytes:
    return hmac.new(key, service_id.encode() + b"\0" + nonce, hashlib.sha256).digest()[:8]


def mint(key: bytes, service_id: str) -> str:
    """A version-4 uuid whose last 8 bytes are the tag of its first 8 (bytes 6 and 8 hold version and variant)."""
    nonce = bytearray(secrets.token_bytes(8))
    nonce[6] = (nonce[6] & 0x0F) | 0x40  # version 4
    tag = bytearray(_tag(key, service_id, bytes(nonce)))
    tag[0] = (tag[0] & 0x3F) | 0x80  # variant 10 (RFC 9562)
    return str(uuid.UUID(bytes=bytes(nonce) + bytes(tag)))


def is_marked(key: bytes, service_id: str, value: str) -> bool:
    try:
        raw = uuid.UUID(value.strip()).bytes
    except (ValueError, AttributeError):
        return False
    expected = bytearray(_tag(key, service_id, raw[:8]))
    expected[0] = (expected[0] & 0x3F) | 0x80
    return hmac.compare_digest(raw[8:], bytes(expected))


class CardIds:
    """Mints and recognises the service's card uuids; the key comes from the setting or, once, from the database."""

    def __init__(self, db: Database, ensure_schema: Callable[[], None], configured: str | None = None) -> None:
        self._db = db
        self._ensure_schema = ensure_schema
        self._key: bytes | None = configured.encode() if configured else None
        self._lock = threading.Lock()
        self._failed_at = 0.0

    def key(self) -> bytes | None:
        """The shared key; None while the database cannot be read (cards then get plain random uuids)."""
        if self._key is not None:
            return self._key
        if time.monotonic() - self._failed_at < _RETRY_AFTER and self._failed_at:
            return None
        with self._lock:
            if self._key is None:
                try:
                    self._key = bytes.fromhex(self._load())
                except (StoreUnavailable, SQLAlchemyError, ValueError) as exc:
                    self._failed_at = time.monotonic()
                    log.warning("card ids: the shared key could not be read (%s); cards get plain uuids", exc)
                    return None
        return self._key

    def _load(self) -> str:
        """The stored key, made first if there is none (the first writer wins; everyone reads what it wrote)."""
        self._ensure_schema()
        try:
            with self._db.engine.begin() as conn:
                conn.execute(
                    insert_ignoring_duplicates(service_secret, self._db.backend).values(
                        name=_KEY_ROW, value=secrets.token_hex(32), created_at=datetime.now(UTC)
                    )
                )
                value = conn.execute(select(service_secret.c.value).where(service_secret.c.name == _KEY_ROW))
                return str(value.scalar_one())
        except SQLAlchemyError as exc:
            raise StoreUnavailable(short_error(exc)) from exc

    def mint(self, service_id: str) -> str:
        key = self.key()
        return mint(key, service_id) if key is not None else str(uuid.uuid4())

    def recognises(self, service_id: str, value: str) -> bool:
        key = self.key()
        return key is not None and is_marked(key, service_id, value)
