"""the agent registry and its event outbox

Revision ID: agents_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "agents_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents_agents",
        sa.Column("agent_id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("max_capacity", sa.Integer(), nullable=False),
        sa.Column("configuration", sa.JSON(), nullable=False),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("session_id", sa.String(36), nullable=True),
        sa.Column("current_load", sa.Integer(), nullable=False),
    )
    op.create_index("ix_agents_agents_owner_name", "agents_agents", ["owner_id", "name"])
    op.create_index("ix_agents_agents_key", "agents_agents", ["key_id"])
    op.create_index("ix_agents_agents_online_seen", "agents_agents", ["online", "last_seen_at"])
    op.create_table(
        "agents_outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("owner_id", sa.String(36), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_agents_outbox_unpublished", "agents_outbox", ["published_at", "id"])


def downgrade() -> None:
    op.drop_table("agents_outbox")
    op.drop_table("agents_agents")
