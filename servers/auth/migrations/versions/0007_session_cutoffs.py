"""a sign-out ends its session's access tokens too, in every service: the sessions ended in
the last access-token lifetime

Revision ID: auth_0007
Revises: auth_0006
"""

import sqlalchemy as sa
from alembic import op

revision = "auth_0007"
down_revision = "auth_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_session_cutoffs",
        sa.Column("session_id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_auth_session_cutoffs_ended_at", "auth_session_cutoffs", ["ended_at"])


def downgrade() -> None:
    op.drop_index("ix_auth_session_cutoffs_ended_at", table_name="auth_session_cutoffs")
    op.drop_table("auth_session_cutoffs")
