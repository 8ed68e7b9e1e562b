"""Initial schema: audit calls and cards, feedback, JWT ids seen."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_call",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(36), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("hook", sa.String(200)),
        sa.Column("hook_instance", sa.String(200)),
        sa.Column("iss", sa.String(500)),
        sa.Column("tenant", sa.String(200)),
        sa.Column("jti", sa.String(200)),
        sa.Column("user_id", sa.String(500)),
        sa.Column("patient_id", sa.String(500)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("orders", sa.JSON, nullable=False),
        sa.Column("cards", sa.JSON, nullable=False),
        sa.Column("system_actions", sa.JSON, nullable=False),
        sa.Column("coverage_assertions", sa.JSON, nullable=False),
        sa.Column("notes", sa.JSON, nullable=False),
        sa.UniqueConstraint("call_id", name="uq_audit_call_call_id"),
    )
    op.create_index("ix_audit_call_started_at", "audit_call", ["started_at"])
    op.create_index("ix_audit_call_hook_instance", "audit_call", ["hook_instance"])
    op.create_table(
        "audit_card",
        sa.Column("card_uuid", sa.String(200), primary_key=True),
        sa.Column(
            "call_id",
            sa.String(36),
            sa.ForeignKey("audit_call.call_id", ondelete="CASCADE", name="fk_audit_card_call_id"),
            nullable=False,
        ),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
    )
    op.create_index("ix_audit_card_call_id", "audit_card", ["call_id"])
    op.create_table(
        "feedback",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("card_uuid", sa.String(200), nullable=False),
        sa.Column("card_known", sa.Boolean, nullable=False),
        sa.Column("call_id", sa.String(36)),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON, nullable=False),
        sa.Column("override_system", sa.String(500)),
        sa.Column("override_code", sa.String(200)),
        sa.Column("override_display", sa.String(500)),
        sa.Column("user_comment", sa.Text),
        sa.Column("outcome_timestamp", _TS, nullable=False),
        sa.Column("iss", sa.String(500)),
        sa.Column("tenant", sa.String(200)),
        sa.UniqueConstraint("dedupe_key", name="uq_feedback_dedupe_key"),
    )
    op.create_index("ix_feedback_received_at", "feedback", ["received_at"])
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    op.create_index("ix_feedback_outcome_timestamp", "feedback", ["outcome_timestamp"])
    op.create_table(
        "jti_seen",
        sa.Column("iss", sa.String(500), primary_key=True),
        sa.Column("jti", sa.String(200), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_jti_seen_expires_at", "jti_seen", ["expires_at"])


def downgrade() -> None:
    op.drop_table("jti_seen")
    op.drop_table("feedback")
    op.drop_table("audit_card")
    op.drop_table("audit_call")
