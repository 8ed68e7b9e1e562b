"""The tables: audit calls, the cards they showed, feedback on those cards, and JWT ids seen (jti)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC (timestamptz on PostgreSQL, naive UTC text on SQLite), read back tz-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite compares timestamps as text: keep one format, without an offset.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite autoincrements only INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

audit_call = Table(
    "audit_call",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("call_id", String(36), nullable=False),  # assigned when queued: a retried write is a no-op
    Column("started_at", UTCDateTime(), nullable=False, index=True),
    Column("service_id", String(200), nullable=False),
    Column("hook", String(200)),
    Column("hook_instance", String(200), index=True),
    Column("iss", String(500)),
    Column("tenant", String(200)),
    Column("jti", String(200)),
    Column("user_id", String(500)),
    Column("patient_id", String(500)),
    Column("status", Integer, nullable=False),
    Column("error", Text),
    Column("duration_ms", Float, nullable=False),
    Column("orders", JSON, nullable=False),
    Column("cards", JSON, nullable=False),
    Column("system_actions", JSON, nullable=False),
    Column("coverage_assertions", JSON, nullable=False),
    Column("notes", JSON, nullable=False),
    UniqueConstraint("call_id", name="uq_audit_call_call_id"),
)

# One row per card returned, so feedback finds its card by uuid without scanning the calls' JSON.
audit_card = Table(
    "audit_card",
    metadata,
    Column("card_uuid", String(200), primary_key=True),
    Column(
        "call_id",
        String(36),
        ForeignKey("audit_call.call_id", ondelete="CASCADE", name="fk_audit_card_call_id"),
        nullable=False,
        index=True,
    ),
    Column("service_id", String(200), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # sha256 of the item's content: the same item sent twice is stored once (CDS Hooks lets clients resend).
    Column("dedupe_key", String(64), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False, index=True),
    Column("service_id", String(200), nullable=False),
    Column("card_uuid", String(200), nullable=False, index=True),
    Column("card_known", Boolean, nullable=False),  # False: no card with this uuid was found when it arrived
    Column("call_id", String(36)),  # the call that showed the card, when known (no FK: purged independently)
    Column("outcome", String(20), nullable=False),
    Column("accepted_suggestions", JSON, nullable=False),
    Column("override_system", String(500)),
    Column("override_code", String(200)),
    Column("override_display", String(500)),
    Column("user_comment", Text),
    Column("outcome_timestamp", UTCDateTime(), nullable=False, index=True),
    Column("iss", String(500)),
    Column("tenant", String(200)),
    UniqueConstraint("dedupe_key", name="uq_feedback_dedupe_key"),
)

jti_seen = Table(
    "jti_seen",
    metadata,
    Column("iss", String(500), primary_key=True),
    Column("jti", String(200), primary_key=True),
    Column("expires_at", Float, nullable=False),
    Index("ix_jti_seen_expires_at", "expires_at"),
)

# Secrets the service makes once and every worker and instance shares (the card-id key); never exported or logged.
service_secret = Table(
    "service_secret",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)
