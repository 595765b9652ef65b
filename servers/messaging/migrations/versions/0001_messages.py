"""inter-agent messages

Revision ID: messaging_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "messaging_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messaging_messages",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("message_id", sa.String(128), nullable=False, unique=True),
        sa.Column("from_agent", sa.String(64), nullable=False),
        sa.Column("from_owner", sa.String(36), nullable=False),
        sa.Column("to_agent", sa.String(64), nullable=False),
        sa.Column("to_owner", sa.String(36), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("awaited_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_messaging_messages_inbox", "messaging_messages", ["to_agent", "acked_at", "created_at"]
    )
    op.create_index(
        "ix_messaging_messages_correlation", "messaging_messages", ["to_agent", "correlation_id"]
    )
    op.create_index(
        "ix_messaging_messages_sent", "messaging_messages", ["from_agent", "correlation_id"]
    )
    op.create_index("ix_messaging_messages_expiry", "messaging_messages", ["expires_at"])


def downgrade() -> None:
    op.drop_table("messaging_messages")
